"""Run-time set-up shared by the stages: logging, seeding, data (the demo's dataset, the
splits and their loaders) and TensorBoard runs.

Loaders make every epoch a pure function of ``(seed, epoch)``: :class:`EpochShuffle` orders
the training split by ``seed + epoch`` and tells the dataset to draw each image's
augmentation from ``(seed, epoch, index)``. One idea serves reproducibility, bitwise
resume after a kill, and the same crops in any number of loader workers.
"""
from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from torch.utils.tensorboard import SummaryWriter

from . import KamalError
from .celeba import (CelebA, CelebAError, device_views, drawing_version, find_celeba,
                     list_digest, pixel_statistics)
from .config import RunConfig
from .distributed import init_distributed, is_main_process, main_process_first, rank_and_world
from .imagecache import build_cache, cache_file
from .synthetic import DRAWING, check_writable, generate

log = logging.getLogger("kamal_attr")


def setup_logging(log_dir: Path) -> None:
    """Log lines to stderr and appended to ``log_dir/log.txt`` (the plain run log); in the
    other processes of a torchrun group, warnings and errors to stderr only."""
    root = logging.getLogger("kamal_attr")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if not is_main_process():
        root.setLevel(logging.WARNING)
        return
    root.setLevel(logging.INFO)
    log_dir.mkdir(parents=True, exist_ok=True)
    logfile = logging.FileHandler(log_dir / "log.txt")
    logfile.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.addHandler(logfile)


def start(cfg: RunConfig, independent: bool = False) -> None:
    """What every script does before its work: join torchrun's processes if started by it
    (``cfg.device`` becomes this process's GPU; ``independent``: no process group, see
    :func:`~kamal_attr.distributed.init_distributed`), set up the logs and the GPU."""
    cfg.device = init_distributed(cfg.device, cfg.batch_size, independent)
    setup_logging(cfg.log_dir)
    configure_device(torch.device(cfg.device))


def configure_device(device: torch.device) -> None:
    """On a GPU: make ``device`` the current one (synchronisation and pinned memory then
    use it, also for ``--device cuda:1`` without torchrun), let cuDNN pick the fastest
    kernels for the fixed input size (``cudnn.benchmark``), and keep float32 convolutions
    in float32 (cuDNN's default TF32 would round the float32 passes of routing and
    evaluation, and ``--fp32`` training, to 10-bit mantissas)."""
    if device.type != "cuda":
        return
    if device.index is not None:  # plain "cuda" is the current device already
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA): what initialises a net's weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def demo_data_needed(cfg: RunConfig) -> bool:
    """Whether the demo must write its synthetic dataset into ``cfg.data_root``.

    Whether the folder holds CelebA is decided by the reader itself (:func:`find_celeba`,
    every layout, also one level down as in ``~/datasets/celeba``): then it is used as it
    is, unless it is a synthetic dataset of ours drawn by an older version of the generator
    (:data:`~kamal_attr.synthetic.DRAWING`), which is drawn again. Otherwise the folder must be missing, empty or a synthetic dataset of ours;
    anything else stops here, before a file is written.
    """
    if not cfg.demo:
        return False
    try:
        layout = find_celeba(cfg.data_root)
        version = drawing_version(layout.attr_file.parent)
        return version is not None and version < DRAWING  # ours, drawn by an older generator
    except CelebAError as e:
        try:
            check_writable(cfg.data_root)
        except KamalError:
            raise KamalError(f"--data_root {cfg.data_root} holds no CelebA the reader recognises "
                             f"({e}) and files the demo did not write; it never writes there: "
                             "fix the folder, or pass a new --data_root for the synthetic "
                             "dataset") from None
        return True


def ensure_data(cfg: RunConfig) -> None:
    """In the demo, write the synthetic dataset on first use (see :func:`demo_data_needed`)
    and its decoded-image cache (into ``cfg.cache_dir``, never into the data folder).
    Without a cache, say once how to make one."""
    def draw() -> None:
        if demo_data_needed(cfg):
            old = drawing_version(Path(cfg.data_root))
            log.info("demo: generating the synthetic dataset in %s (%s)", cfg.data_root,
                     "once" if old is None else f"again: it was drawn by version {old} of "
                     f"the generator, this is version {DRAWING}")
            generate(cfg.data_root)

    main_process_first(draw)  # the other processes read it only once it is there
    if not cfg.use_cache:
        return
    path = cache_file(cfg.data_root, cfg.image_size, cfg.cache_dir)
    main_process_first(lambda: build_cache(cfg.data_root, cfg.image_size, cfg.cache_dir)
                       if cfg.demo and not path.exists() else None)
    if not path.exists():
        log.info("reading JPEGs with %d loader workers; to read no JPEG per epoch, decode them "
                 "once: python -m kamal_attr.imagecache --data_root %s --image_size %d "
                 "--cache_dir %s", cfg.workers, cfg.data_root, cfg.image_size, cfg.cache_dir.resolve())


def data_digest(root: Path) -> str:
    """SHA-256 (16 hex digits) of a dataset's attribute and partition lists: a dataset
    regenerated or replaced in the same folder makes the nets trained on it stale."""
    return list_digest(find_celeba(root))


def dataset(cfg: RunConfig, split: str, attributes: Sequence[str], train: bool = False,
            part: tuple[int, int] | None = None) -> CelebA:
    """One split; reads the decoded-image cache when there is one (and ``--no_cache`` is
    not given), else the JPEGs."""
    return CelebA(cfg.data_root, split, attributes, cfg.image_size, train=train, part=part,
                  cache_dir=cfg.cache_dir if cfg.use_cache else None)


class EpochShuffle(DistributedSampler):
    """``DistributedSampler`` whose ``set_epoch`` also reseeds the dataset's augmentation.

    The order of epoch e is a permutation seeded by ``seed + e``; with one process
    (``num_replicas=1``) it covers the whole split.
    """

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch, self.seed)


class DeviceBatches:
    """A ``DataLoader`` whose batches arrive on the device, ready for a net: images as
    normalised float32 channels-last, labels on the device, the index on the CPU (where
    per-image lookups such as the routing are made without waiting for the device).
    Stored uint8 images (a decoded-image cache) are cut, flipped and normalised there
    (:func:`~kamal_attr.celeba.device_views`)."""

    def __init__(self, loader: DataLoader, device: torch.device, image_size: int) -> None:
        self.loader, self.device, self.image_size = loader, device, image_size
        self.sampler, self.dataset = loader.sampler, loader.dataset
        self.statistics = pixel_statistics(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            images, labels, index = batch[:3]
            images = images.to(self.device, non_blocking=True)
            if len(batch) == 4:
                images = device_views(images, batch[3].to(self.device, non_blocking=True),
                                      self.image_size, self.statistics)
            else:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True), index


def _loader(cfg: RunConfig, data: CelebA, batch_size: int, **kwargs) -> DeviceBatches:
    device = torch.device(cfg.device)
    # Workers are not persistent: each epoch's set_epoch changes the dataset, which
    # workers copy when an epoch starts.
    loader = DataLoader(data, batch_size=batch_size, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False, **kwargs)
    return DeviceBatches(loader, device, cfg.image_size)


def train_loader(cfg: RunConfig, data: CelebA, seed: int) -> DeviceBatches:
    """Shuffled, augmented batches; epoch e depends only on ``(seed, e)``. Under torchrun
    each of the W processes gets ``batch_size / W`` images of every global batch, the
    same images a single process would see in that step."""
    rank, world = rank_and_world()
    sampler = EpochShuffle(data, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                           drop_last=True)  # no padding: W processes see what one would
    return _loader(cfg, data, cfg.batch_size // world, sampler=sampler, drop_last=True)


def eval_loader(cfg: RunConfig, data: CelebA) -> DeviceBatches:
    """The eval view in file order: row n of a prediction is image n."""
    return _loader(cfg, data.view(train=False), cfg.batch_size, shuffle=False)


def open_writer(run_dir: Path, cfg: RunConfig, about: dict, start_epoch: int) -> SummaryWriter | None:
    """The TensorBoard run of one net (None outside the main process), appended to its
    folder: no event file is removed. The new file starts with TensorBoard's purge marker
    (a ``SessionLog.START`` at ``purge_step``), so that TensorBoard hides the folder's older
    events from step 0 on for a fresh start (an earlier run of the net) and from
    ``start_epoch`` on when resuming. The marker is written twice: TensorBoard's Python
    loader (``--load_fast=false``) takes the first of a run for its start and purges from
    the second on, and a folder written by an earlier version holds none."""
    if not is_main_process():
        return None
    purge = start_epoch if start_epoch > 1 else 0
    writer = SummaryWriter(str(run_dir), purge_step=purge)
    writer.file_writer.add_event(Event(step=purge, session_log=SessionLog(status=SessionLog.START)))
    writer.add_text("args", "```\n" + json.dumps({**cfg.args, **about}, indent=1, default=str)
                    + "\n```", start_epoch)
    return writer
