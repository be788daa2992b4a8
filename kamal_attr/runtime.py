"""Run-time set-up shared by the stages: logging, seeding, data (the demo's dataset, the
splits and their loaders) and TensorBoard runs.

Loaders make every epoch a pure function of ``(seed, epoch)``: :class:`EpochShuffle` orders
the training split by ``seed + epoch`` and tells the dataset to draw each image's
augmentation from ``(seed, epoch, index)``. One idea serves reproducibility, bitwise
resume after a kill, and the same crops in any number of loader workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from . import KamalError
from .celeba import CelebA, CelebAError, find_celeba
from .config import RunConfig
from .synthetic import check_writable, generate

log = logging.getLogger("kamal_attr")


def setup_logging(log_dir: Path) -> None:
    """Log lines to stderr and appended to ``log_dir/log.txt`` (the plain run log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("kamal_attr")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    logfile = logging.FileHandler(log_dir / "log.txt")
    logfile.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.addHandler(console)
    root.addHandler(logfile)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA): what initialises a net's weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def demo_data_needed(cfg: RunConfig) -> bool:
    """Whether the demo must write its synthetic dataset into ``cfg.data_root``.

    Whether the folder holds CelebA is decided by the reader itself (:func:`find_celeba`,
    every layout, also one level down as in ``~/datasets/celeba``): then it is used as it
    is. Otherwise the folder must be missing, empty or a synthetic dataset of ours;
    anything else stops here, before a file is written.
    """
    if not cfg.demo:
        return False
    try:
        find_celeba(cfg.data_root)
        return False
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
    """In the demo, write the synthetic dataset on first use (see :func:`demo_data_needed`)."""
    if demo_data_needed(cfg):
        log.info("demo: generating the synthetic dataset in %s (once)", cfg.data_root)
        generate(cfg.data_root)


def data_digest(root: Path) -> str:
    """SHA-256 (16 hex digits) of a dataset's attribute and partition lists: a dataset
    regenerated or replaced in the same folder makes the nets trained on it stale."""
    layout = find_celeba(root)
    h = hashlib.sha256()
    for path in (layout.attr_file, layout.partition_file):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def dataset(cfg: RunConfig, split: str, attributes: Sequence[str], train: bool = False,
            part: tuple[int, int] | None = None) -> CelebA:
    return CelebA(cfg.data_root, split, attributes, cfg.image_size, train=train, part=part,
                  cache=cfg.cache_images)


class EpochShuffle(DistributedSampler):
    """``DistributedSampler`` whose ``set_epoch`` also reseeds the dataset's augmentation.

    The order of epoch e is a permutation seeded by ``seed + e``; with one process
    (``num_replicas=1``) it covers the whole split.
    """

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch, self.seed)


def train_loader(cfg: RunConfig, data: CelebA, seed: int) -> DataLoader:
    """Shuffled, augmented batches; epoch e depends only on ``(seed, e)``."""
    sampler = EpochShuffle(data, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.workers, pin_memory=torch.device(cfg.device).type == "cuda")


def eval_loader(cfg: RunConfig, data: CelebA) -> DataLoader:
    """The eval view in file order: row n of a prediction is image n."""
    return DataLoader(data.view(train=False), batch_size=cfg.batch_size, shuffle=False,
                      num_workers=cfg.workers, pin_memory=torch.device(cfg.device).type == "cuda")


def open_writer(run_dir: Path, cfg: RunConfig, about: dict, start_epoch: int) -> SummaryWriter:
    """The TensorBoard run of one net. A fresh start removes the run's old event files (and
    only those); a resumed one keeps them and drops their events from ``start_epoch`` on."""
    if start_epoch == 1:
        for events in run_dir.glob("events.out.tfevents.*"):
            events.unlink()
    writer = SummaryWriter(str(run_dir), purge_step=start_epoch if start_epoch > 1 else None)
    writer.add_text("args", "```\n" + json.dumps({**cfg.args, **about}, indent=1, default=str)
                    + "\n```", start_epoch)
    return writer
