"""The paper's stages as functions the scripts call: source nets, routing, component nets,
target net. Each builds its data, method, optimiser and TensorBoard run, then calls the
shared :func:`kamal_attr.engine.fit`; finished checkpoints are reused unless ``overwrite``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from . import KamalError
from .attributes import GROUPS, SourceNetSpec, source_nets_of
from .celeba import CelebA
from .checkpoint import (atomic_save, component_dir, epoch_file, load_checkpoint, load_net,
                         net_record, source_dir, target_dir)
from .config import RunConfig
from .engine import build_optimizer, build_scheduler, fit, place, predict
from .losses import entropy_impurity, route_by_entropy
from .methods import Method, SelectiveAmalgamation, SourceTraining, TargetAmalgamation
from .models import AttributeResNet, build_model
from .synthetic import generate, is_complete

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
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def ensure_data(cfg: RunConfig) -> None:
    """In the demo, write the synthetic dataset on first use."""
    if cfg.demo and not is_complete(cfg.data_root):
        log.info("demo: generating the synthetic dataset in %s (once)", cfg.data_root)
        generate(cfg.data_root)


def dataset(cfg: RunConfig, split: str, attributes: Sequence[str], train: bool = False,
            part: tuple[int, int] | None = None) -> CelebA:
    return CelebA(cfg.data_root, split, attributes, cfg.image_size, train=train, part=part,
                  cache=cfg.cache_images)


class GroupData:
    """A group's train and val images with labels of all its attributes, decoded on first
    use and shared by its component nets and its target net (decoding once, not five times)."""

    def __init__(self, group: str, cfg: RunConfig) -> None:
        self.attributes = GROUPS[group]
        self.cfg = cfg

    @cached_property
    def train(self) -> CelebA:
        return dataset(self.cfg, "train", self.attributes, train=True)

    @cached_property
    def val(self) -> CelebA:
        return dataset(self.cfg, "val", self.attributes)


def loader(cfg: RunConfig, data: CelebA, shuffle: bool) -> DataLoader:
    """Seeded loader: shuffling and workers' augmentation follow ``cfg.seed``."""
    device = torch.device(cfg.device)
    return DataLoader(data, batch_size=cfg.batch_size, shuffle=shuffle, drop_last=shuffle,
                      num_workers=cfg.workers, worker_init_fn=_seed_worker,
                      generator=torch.Generator().manual_seed(cfg.seed),
                      pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)


def _writer(run_dir: Path, cfg: RunConfig, about: dict) -> SummaryWriter:
    """A fresh TensorBoard run (a retrained net replaces its old events: one writer a folder)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("args", "```\n" + json.dumps({**cfg.args, **about}, indent=1, default=str)
                    + "\n```")
    return writer


def _fit_and_save(method: Method, cfg: RunConfig, name: str, epochs: int, optim_cfg,
                  train_data: CelebA, val_data: CelebA, out_dir: Path, run_dir: Path,
                  record: dict, val_columns: Sequence[int] | None = None) -> Path:
    """The part every stage shares: optimiser, scheduler, TensorBoard, per-epoch checkpoints."""
    device = torch.device(cfg.device)
    place(method, device)
    optimizer = build_optimizer(method.parameter_groups(optim_cfg.lr), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, epochs)
    writer = _writer(run_dir, cfg, {"net": name, **{k: v for k, v in record.items()
                                                      if k != "kind"}})
    kind = record["kind"]

    def save(epoch: int, accuracy: dict[str, float]) -> None:
        ckpt = net_record(kind, method.student, cfg.image_size, epoch, val_accuracy=accuracy,
                          **{k: v for k, v in record.items() if k != "kind"})
        atomic_save(ckpt, epoch_file(out_dir, epoch))
        atomic_save({**ckpt, "method": method.trainable_state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}, out_dir / "last.pth")

    try:
        fit(method, loader(cfg, train_data, shuffle=True), loader(cfg, val_data, shuffle=False),
            optimizer, scheduler, epochs, device, writer, save, name=name, val_columns=val_columns)
    finally:
        writer.close()
    final = epoch_file(out_dir, epochs)
    log.info("%s: saved %s", name, final)
    return final


def source_part(cfg: RunConfig, spec: SourceNetSpec,
                part: tuple[int, int] | None) -> tuple[int, int] | None:
    """The training part of a source net: ``part`` if given; in the demo, the k-th of the S
    source nets of an attribute trains on part k of S, so an attribute's teachers saw
    disjoint data that together covers the training split (each photo style has an expert)."""
    if part is not None or not cfg.split_train_among_sources or spec.label:
        return part
    peers = source_nets_of(spec.group, spec.component)
    return (peers.index(spec) + 1, len(peers))


def train_source_net(spec: SourceNetSpec, cfg: RunConfig,
                     part: tuple[int, int] | None = None) -> Path:
    """Supervised training of one source net (a published teacher, here trained ourselves)."""
    out_dir = source_dir(cfg.sources_root, spec)
    final = epoch_file(out_dir, cfg.source_epochs)
    part = source_part(cfg, spec, part)
    part_record = list(part) if part else None  # as checkpoints store it
    if final.exists() and not cfg.overwrite:
        log.info("%s/%s: %s exists, reusing it (--overwrite retrains)", spec.group, spec.name, final)
        trained_on = load_checkpoint(final).get("train_part")
        if trained_on != part_record:
            log.warning("%s was trained on part %s of the training split, this run asks for %s; "
                        "--overwrite retrains it", final, trained_on, part_record)
        return final
    seed_everything(cfg.seed + 1000 * spec.source_id)
    train_data = dataset(cfg, "train", spec.attributes, train=True, part=part)
    val_data = dataset(cfg, "val", spec.attributes)
    model, init = build_model(spec.attributes, cfg.width, cfg.pretrained, cfg.weights_dir)
    log.info("%s/%s: attributes %s, %d training images%s, %s", spec.group, spec.name,
             ", ".join(spec.attributes), len(train_data),
             f" (part {part[0]}/{part[1]})" if part else "", init)
    record = {"kind": "source", "group": spec.group, "source_id": spec.source_id,
              "train_part": part_record, "init": init}
    return _fit_and_save(SourceTraining(model), cfg, f"{spec.group}/{spec.name}",
                         cfg.source_epochs, cfg.source_optim, train_data, val_data, out_dir,
                         cfg.log_dir / "sources" / spec.group / spec.name, record)


def source_checkpoints(group: str, component: str, cfg: RunConfig) -> list[tuple[SourceNetSpec, Path]]:
    """The source nets of ``component`` (epoch ``source_save_epoch``); raises listing every
    missing file with the command that trains it."""
    found = [(s, epoch_file(source_dir(cfg.sources_root, s), cfg.source_save_epoch))
             for s in source_nets_of(group, component)]
    missing = [(s, p) for s, p in found if not p.exists()]
    if missing:
        demo = " --demo" if cfg.demo else ""
        where = (f" --sourcenets_root {cfg.sources_root} --data_root {cfg.data_root}"
                 f" --image_size {cfg.image_size}")
        lines = [f"  {p}\n    make it with: python train_sourcenet.py{demo} --target_attribute "
                 f"{s.component} --source_id {s.source_id} --epochs {cfg.source_save_epoch}{where}"
                 for s, p in missing]
        raise KamalError(f"{len(missing)} source net(s) of {component} missing "
                         f"(epoch {cfg.source_save_epoch}, --sorce_saveEpoch):\n" + "\n".join(lines))
    return found


def load_teachers(found: list[tuple[SourceNetSpec, Path]], component: str,
                  cfg: RunConfig) -> list[AttributeResNet]:
    teachers = []
    for spec, path in found:
        net, rec = load_net(path, kind="source", attribute=component, image_size=cfg.image_size)
        log.info("  teacher %s: %s (epoch %d, width %d)", spec.name, path, rec["epoch"], rec["width"])
        teachers.append(net)
    return teachers


def compute_routing(teachers: Sequence[AttributeResNet], component: str, data: CelebA,
                    cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy impurity of every teacher on every image (eval view); returns
    ``(entropies (N, S), weights (N, S))`` for ``cfg.selection``."""
    device = torch.device(cfg.device)
    eval_loader = loader(cfg, data, shuffle=False)
    entropies = []
    for k, teacher in enumerate(teachers):
        logits, _ = predict(teacher, eval_loader, device, desc=f"routing: teacher {k + 1}")
        entropies.append(entropy_impurity(logits[:, teacher.attributes.index(component)]))
    entropies = torch.stack(entropies, dim=1)
    n, s = entropies.shape
    if cfg.selection == "entropy":
        choice = route_by_entropy(entropies)
    elif cfg.selection == "random":
        choice = torch.randint(0, s, (n,), generator=torch.Generator().manual_seed(cfg.seed))
    else:
        return entropies, torch.full((n, s), 1.0 / s)
    return entropies, torch.nn.functional.one_hot(choice, s).float()


def write_routing(folder: Path, specs: Sequence[SourceNetSpec], files: Sequence[Path],
                  weights: torch.Tensor) -> list[Path]:
    """One list of image file names per source net (the seed's ``--sourcedata_txtroot``),
    rewritten atomically on every run, never appended to."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, spec in enumerate(specs):
        path = folder / f"{spec.name}.txt"
        chosen = [files[n].name for n in torch.nonzero(weights[:, i] > 0).squeeze(1).tolist()]
        tmp = path.with_suffix(".txt.tmp")
        tmp.write_text("".join(name + "\n" for name in chosen))
        os.replace(tmp, path)
        written.append(path)
    return written


def train_component(group: str, component: str, cfg: RunConfig,
                    data: GroupData | None = None) -> Path:
    """Stage 1: selective learning of one component net from its source nets."""
    out_dir = component_dir(cfg.components_root, group, cfg.variant, component)
    final = epoch_file(out_dir, cfg.component_epochs)
    if final.exists() and not cfg.overwrite:
        log.info("component %s/%s: %s exists, reusing it", group, component, final)
        return final
    found = source_checkpoints(group, component, cfg)
    log.info("component %s/%s (%s): %d source nets", group, component, cfg.variant, len(found))
    teachers = load_teachers(found, component, cfg)
    seed_everything(cfg.seed)
    data = data or GroupData(group, cfg)
    train_data = data.train
    entropies, weights = compute_routing(teachers, component, train_data.view(train=False), cfg)
    specs = [s for s, _ in found]
    lists = write_routing(cfg.routing_root / group / cfg.selection, specs, train_data.files, weights)
    share = weights.sum(0) / weights.sum()
    log.info("  routing (%s): %s; lists in %s", cfg.selection,
             ", ".join(f"{s.name} {v:.1%}" for s, v in zip(specs, share.tolist())), lists[0].parent)
    student = AttributeResNet([component], cfg.width)
    method = SelectiveAmalgamation(student, teachers, component, weights, cfg.feature_loss)
    record = {"kind": "component", "group": group, "variant": cfg.variant,
              "sources": [str(p) for _, p in found], "routing_share": share.tolist()}
    run_dir = cfg.log_dir / "components" / group / cfg.variant / component
    path = _fit_and_save(method, cfg, f"component {group}/{component}", cfg.component_epochs,
                         cfg.amalgamation_optim, train_data, data.val, out_dir, run_dir, record,
                         val_columns=[data.attributes.index(component)])
    with SummaryWriter(str(run_dir)) as writer:
        for s, v in zip(specs, share.tolist()):
            writer.add_scalar(f"routing/share/{s.name}", v, 0)
        writer.add_histogram("routing/entropy_min", entropies.min(dim=1).values, 0)
    return path


def train_target(group: str, cfg: RunConfig, data: GroupData | None = None) -> Path:
    """Stage 2: the multi-head target net from all component nets of ``group``."""
    attributes = GROUPS[group]
    out_dir = target_dir(cfg.target_root, group, cfg.variant)
    final = epoch_file(out_dir, cfg.target_epochs)
    if final.exists() and not cfg.overwrite:
        log.info("target %s: %s exists, reusing it", group, final)
        return final
    components = []
    for attribute in attributes:
        path = epoch_file(component_dir(cfg.components_root, group, cfg.variant, attribute),
                          cfg.component_epochs)
        if not path.exists():
            raise KamalError(f"component net {path} missing; train it with: python train.py "
                             f"--target_attribute {group} --stage component"
                             + (" --demo" if cfg.demo else ""))
        net, _ = load_net(path, kind="component", attribute=attribute, image_size=cfg.image_size)
        log.info("  component %s: %s", attribute, path)
        components.append(net)
    seed_everything(cfg.seed)
    student = AttributeResNet(attributes, cfg.target_width)
    method = TargetAmalgamation(student, components, cfg.feature_loss)
    log.info("target %s (%s): width %d, %.1fM parameters, heads %s", group, cfg.variant,
             cfg.target_width, sum(p.numel() for p in student.parameters()) / 1e6,
             ", ".join(attributes))
    record = {"kind": "target", "group": group, "variant": cfg.variant}
    data = data or GroupData(group, cfg)
    return _fit_and_save(method, cfg, f"target {group}", cfg.target_epochs, cfg.amalgamation_optim,
                         data.train, data.val, out_dir,
                         cfg.log_dir / "target" / group / cfg.variant, record)
