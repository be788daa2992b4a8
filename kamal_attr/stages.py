"""The paper's stages as functions the scripts call: source nets, component nets, target net.

Each stage writes down its net's *recipe* (what decides its weights; see
:mod:`kamal_attr.checkpoint`), lets :func:`~kamal_attr.checkpoint.plan_training` decide
whether to reuse, resume or start it, builds its method, and hands it to :func:`train_net`,
which every stage shares: optimiser, scheduler, TensorBoard run, resume, per-epoch
checkpoints around :func:`kamal_attr.engine.fit`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from . import KamalError
from .attributes import SourceNetSpec, source_nets_of
from .celeba import IMAGENET_MEAN, IMAGENET_STD, CelebA
from .checkpoint import (TrainingPlan, atomic_save, component_dir, epoch_file, fingerprint,
                         load_net, net_record, other_epochs, plan_training, saved_epoch,
                         source_dir, target_dir, weights_digest)
from .config import DEMO, RunConfig
from .distributed import barrier, is_main_process, main_process_first, rank_and_world
from .engine import OptimConfig, build_optimizer, build_scheduler, fit, place
from .methods import Method, SelectiveAmalgamation, SourceTraining, TargetAmalgamation
from .models import AttributeResNet, build_model, check_tap_sizes, describe_init, input_adapter
from .pool import Task, demo_teachers, named_attributes, select_task
from .routing import compute_routing, write_routing
from .runtime import data_digest, dataset, eval_loader, open_writer, seed_everything, train_loader

log = logging.getLogger("kamal_attr")


class TaskData:
    """A task's train and val images with labels of all its attributes, decoded on first
    use and shared by its component nets and its target net (decoding once, not five times)."""

    def __init__(self, task: Task, cfg: RunConfig) -> None:
        self.attributes = task.attributes
        self.cfg = cfg

    @cached_property
    def train(self) -> CelebA:
        return dataset(self.cfg, "train", self.attributes, train=True)

    @cached_property
    def val(self) -> CelebA:
        return dataset(self.cfg, "val", self.attributes)


def make_recipe(cfg: RunConfig, stage: str, optim: OptimConfig, epochs: int, seed: int,
                arch: str, **specific: Any) -> dict[str, Any]:
    """What decides a net's weights, as plain JSON values (see :mod:`kamal_attr.checkpoint`).

    The data enters by its digest (its lists, as the decoded-image cache is keyed), not its
    folder: a dataset moved or copied (to a job's scratch disk) keeps its nets and resumes.
    Left out on purpose: the device, loader workers and output folders (they change where
    and how fast, not what is learnt)."""
    recipe = {"stage": stage, "arch": arch, "image_size": cfg.image_size,
              "data": data_digest(cfg.data_root), "seed": seed,
              "batch_size": cfg.batch_size, "optim": asdict(optim), "epochs": epochs, **specific}
    return json.loads(json.dumps(recipe))


def plan_net(out_dir: Path, epochs: int, recipe: dict[str, Any], cfg: RunConfig, name: str,
             retrain: str) -> TrainingPlan:
    """:func:`~kamal_attr.checkpoint.plan_training`, made by the main process first (which
    alone may remove files, for ``--overwrite``, and reports a stale net); the others then
    read the same folder."""
    decided = main_process_first(
        lambda: plan_training(out_dir, epochs, recipe, cfg.overwrite, name, retrain))
    return decided or plan_training(out_dir, epochs, recipe, False, name, retrain)


def train_net(method: Method, plan: TrainingPlan, recipe: dict[str, Any], cfg: RunConfig,
              name: str, epochs: int, optim_cfg: OptimConfig, seed: int, train_data: CelebA,
              val_data: CelebA, run_dir: Path, record: dict[str, Any],
              val_columns: Sequence[int] | None = None) -> Path:
    """What every stage shares: optimiser, per-epoch scheduler, TensorBoard, resume from
    ``plan.resume`` (model, bridges, optimiser, scheduler; data order and augmentation follow
    from the seed and the epoch), and per-epoch checkpoints that carry ``recipe``."""
    device = torch.device(cfg.device)
    place(method, device)
    # How, not what, it learns (outside the recipe): recorded, and a resume under other
    # conditions is allowed but said, since it is then not bitwise an uninterrupted run.
    conditions = {"precision": "bf16" if cfg.bf16 else "fp32",
                  "images": "cache" if train_data.stored is not None else "jpeg",
                  "processes": rank_and_world()[1]}
    # where the data was read from: said, not compared (the recipe holds the data's digest)
    record = {**record, "conditions": conditions, "data_root": str(Path(cfg.data_root).resolve())}
    optimizer = build_optimizer(method.parameter_groups(optim_cfg.lr), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, epochs)
    if plan.resume is not None:
        missing, unexpected = method.load_state_dict(plan.resume["method"], strict=False)
        if unexpected or any(not k.startswith("teachers.") for k in missing):
            raise KamalError(f"{plan.out_dir / 'last.pth'} does not fit this net "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); "
                             "--overwrite starts over")
        optimizer.load_state_dict(plan.resume["optimizer"])
        scheduler.load_state_dict(plan.resume["scheduler"])
        log.info("%s: resumed from %s after epoch %d of %d", name, plan.out_dir / "last.pth",
                 plan.start_epoch - 1, epochs)
        before = plan.resume.get("conditions", conditions)
        changed = [f"{k}: {before.get(k)} -> {v}" for k, v in conditions.items() if before.get(k) != v]
        if changed:
            log.warning("%s: epochs 1-%d ran under other conditions (%s); the result will not be "
                        "bitwise that of an uninterrupted run", name, plan.start_epoch - 1,
                        ", ".join(changed))
    kind = record["kind"]
    extra = {k: v for k, v in record.items() if k != "kind"}
    writer = open_writer(run_dir, cfg, {"net": name, "fingerprint": fingerprint(recipe), **extra},
                         plan.start_epoch)

    # One entry per epoch (losses, lr, img/s, diagnostics, val accuracy): the curves of the
    # report, kept in every checkpoint; a resume keeps those of the epochs it continues.
    history = [h for h in (plan.resume or {}).get("history", []) if h["epoch"] < plan.start_epoch]

    def save(epoch: int, accuracy: dict[str, float], figures: dict[str, float]) -> None:
        history.append({"epoch": epoch, **figures, "val_accuracy": accuracy})  # main process only
        ckpt = net_record(kind, method.student, cfg.image_size, epoch, recipe,
                          val_accuracy=accuracy, history=history, **extra)
        atomic_save(ckpt, epoch_file(plan.out_dir, epoch))
        atomic_save({**ckpt, "method": method.trainable_state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}, plan.out_dir / "last.pth")

    try:
        fit(method, train_loader(cfg, train_data, seed), eval_loader(cfg, val_data), optimizer,
            scheduler, epochs, device, writer, save, start_epoch=plan.start_epoch, name=name,
            val_columns=val_columns, bf16=cfg.bf16)
    finally:
        if writer is not None:
            writer.close()
    barrier()  # the other processes go on once the main one has saved the final epoch
    log.info("%s: saved %s", name, plan.final)  # (their logs show warnings only)
    return plan.final


def _retrain_source(cfg: RunConfig, spec: SourceNetSpec) -> str:
    which = (f"--attributes {' '.join(spec.attributes)} --name {spec.label}" if spec.label
             else f"--target_attribute {spec.component} --source_id {spec.source_id}")
    return f"python train_sourcenet.py{' --demo' if cfg.demo else ''} {which} (and the flags it was trained with)"


#: The hint of a stale component or target net: the user's own command retrains it.
RETRAIN_AMALGAMATION = "this train.py command"


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
    """Supervised training of one source net (a published teacher, here trained ourselves),
    with batches of ``cfg.source_batch_size``."""
    cfg = dataclasses.replace(cfg, batch_size=cfg.source_batch_size)
    world = rank_and_world()[1]
    if cfg.batch_size % world:
        raise KamalError(f"source nets' batch size {cfg.batch_size} must be a multiple of the "
                         f"{world} torchrun processes; pass --batch_size")
    part = source_part(cfg, spec, part)
    seed = cfg.seed + 1000 * spec.source_id
    init = describe_init(cfg.pretrained, cfg.width, cfg.weights_dir, cfg.arch)
    recipe = make_recipe(cfg, "source", cfg.source_optim, cfg.source_epochs, seed, cfg.arch,
                         attributes=list(spec.attributes), width=cfg.width,
                         train_part=list(part) if part else None, init=init)
    name = f"{spec.group}/{spec.name}"
    plan = plan_net(source_dir(cfg.sources_root, spec), cfg.source_epochs, recipe, cfg, name,
                _retrain_source(cfg, spec))
    if plan.done:
        log.info("%s: %s exists, reusing it (same recipe)", name, plan.final)
        return plan.final
    seed_everything(seed)
    train_data = dataset(cfg, "train", spec.attributes, train=True, part=part)
    val_data = dataset(cfg, "val", spec.attributes)
    model, init = build_model(spec.attributes, cfg.width, cfg.pretrained, cfg.weights_dir, cfg.arch)
    log.info("%s: %s width %d, attributes %s, %d training images%s, %s", name, cfg.arch,
             cfg.width, ", ".join(spec.attributes), len(train_data),
             f" (part {part[0]}/{part[1]})" if part else "", init)
    record = {"kind": "source", "group": spec.group, "source_id": spec.source_id,
              "train_part": recipe["train_part"], "init": init}
    return train_net(SourceTraining(model), plan, recipe, cfg, name, cfg.source_epochs,
                     cfg.source_optim, seed, train_data, val_data,
                     cfg.log_dir / "sources" / spec.group / spec.name, record)


def check_teachers(task: Task, attribute: str, cfg: RunConfig) -> None:
    """Raises listing every missing teacher file of ``attribute`` with the epochs that do
    exist, or the command that trains it (pool teachers exist by construction)."""
    missing = [t for t in task.teachers[attribute] if not t.path.exists()]
    if not missing:
        return
    demo = " --demo" if cfg.demo else ""
    where = (f" --sourcenets_root {cfg.sources_root} --data_root {cfg.data_root}"
             f" --image_size {cfg.image_size}")
    lines = []
    for t in missing:
        if t.spec is None:  # a pool teacher that went away since the pool was read
            lines.append(f"  {t.path}\n    it was in the pool a moment ago; rerun")
            continue
        how = other_epochs(t.path.parent, "--sorce_saveEpoch") or (
            f"make it with: python train_sourcenet.py{demo} --target_attribute "
            f"{t.spec.component} --source_id {t.spec.source_id} --epochs {cfg.source_save_epoch}{where}")
        lines.append(f"  {t.path}\n    {how}")
    raise KamalError(f"{len(missing)} source net(s) of {attribute} missing "
                     f"(epoch {cfg.source_save_epoch}, --sorce_saveEpoch):\n" + "\n".join(lines))


@dataclass
class LoadedTeachers:
    """A component's teachers, ready for stage 1: the nets (eval mode), what feeds each its
    own input, and their weight digests (name -> digest), which enter the component's
    recipe: a retrained teacher makes its components stale."""

    nets: list[AttributeResNet]
    inputs: list[nn.Module]
    digests: dict[str, str]


def load_teachers(task: Task, attribute: str, cfg: RunConfig) -> LoadedTeachers:
    """Load the teachers of ``attribute``; with the feature loss, check that every teacher's
    taps have the student's spatial sizes (:func:`~kamal_attr.models.check_tap_sizes`)."""
    check_teachers(task, attribute, cfg)
    loaded = LoadedTeachers([], [], {})
    sizes = []
    for t in task.teachers[attribute]:
        net, rec = load_net(t.path, kind="source", attribute=attribute)
        fed = input_adapter(rec, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
        log.info("  teacher %s: %s (%s, width %d, %d px, epoch %d, head %d of %d)%s", t.name,
                 t.path, net.arch, net.width, rec["image_size"], rec["epoch"],
                 net.attributes.index(attribute) + 1, len(net.attributes),
                 "" if isinstance(fed, nn.Identity) else ", fed its own input size and normalisation")
        loaded.nets.append(net)
        loaded.inputs.append(fed)
        loaded.digests[t.name] = weights_digest(net.state_dict())
        sizes.append((t.name, net, rec["image_size"]))
    if cfg.feature_loss:
        check_tap_sizes(AttributeResNet([attribute], cfg.width, cfg.arch), cfg.image_size, sizes)
    return loaded


def train_component(task: Task, attribute: str, cfg: RunConfig,
                    data: TaskData | None = None) -> Path:
    """Stage 1: selective learning of one component net from its teachers."""
    teachers = task.teachers[attribute]
    loaded = load_teachers(task, attribute, cfg)
    recipe = make_recipe(cfg, "component", cfg.amalgamation_optim, cfg.component_epochs,
                         cfg.seed, cfg.arch, group=task.name, attribute=attribute,
                         width=cfg.width, selection=cfg.selection, feature_loss=cfg.feature_loss,
                         teachers=loaded.digests, loss="mean per source net",
                         # only where it changes the loss (with the feature loss)
                         **({} if cfg.penalty or not cfg.feature_loss else {"penalty": False}))
    name = f"component {task.name}/{attribute}"
    plan = plan_net(component_dir(cfg.components_root, task.name, cfg.variant, attribute),
                    cfg.component_epochs, recipe, cfg, name, RETRAIN_AMALGAMATION)
    if plan.done:
        log.info("%s: %s exists, reusing it (same recipe)", name, plan.final)
        return plan.final
    log.info("%s (%s): %d source nets", name, cfg.variant, len(teachers))
    seed_everything(cfg.seed)
    data = data or TaskData(task, cfg)
    entropies, weights = compute_routing(loaded.nets, attribute, data.train, cfg, loaded.inputs)
    share = weights.sum(0) / weights.sum()
    if is_main_process():
        lists = write_routing(task.routing_folder(cfg.routing_root, cfg.selection, attribute),
                              [t.name for t in teachers], data.train.files, weights)
        log.info("  routing (%s): %s; lists in %s", cfg.selection,
                 ", ".join(f"{t.name} {v:.1%}" for t, v in zip(teachers, share.tolist())),
                 lists[0].parent)
    student = AttributeResNet([attribute], cfg.width, cfg.arch)
    method = SelectiveAmalgamation(student, loaded.nets, attribute, weights, cfg.feature_loss,
                                   loaded.inputs, cfg.penalty)
    record = {"kind": "component", "group": task.name, "variant": cfg.variant,
              "sources": [str(t.path) for t in teachers], "routing_share": share.tolist()}
    run_dir = cfg.log_dir / "components" / task.name / cfg.variant / attribute
    path = train_net(method, plan, recipe, cfg, name, cfg.component_epochs,
                     cfg.amalgamation_optim, cfg.seed, data.train, data.val, run_dir, record,
                     val_columns=[data.attributes.index(attribute)])
    if is_main_process():
        with SummaryWriter(str(run_dir)) as writer:
            for t, v in zip(teachers, share.tolist()):
                writer.add_scalar(f"routing/share/{t.name}", v, 0)
            writer.add_histogram("routing/entropy_min", entropies.min(dim=1).values, 0)
    return path


def task_flags(task: Task, cfg: RunConfig) -> str:
    """The ``train.py`` flags that select ``task`` (and ``--demo``), for hints in errors."""
    which = (f"--target_attribute {task.name}" if task.preset else
             f"--attributes {' '.join(task.attributes)} --name {task.name}")
    return which + (" --demo" if cfg.demo else "")


def check_component_teachers(task: Task, attribute: str, path: Path, record: dict[str, Any],
                             cfg: RunConfig) -> None:
    """Stop if a teacher this run names for ``attribute`` (where it is on disk) has other
    weights than the component at ``path`` learnt from under that name: its digest differs
    from the one in the component's recipe (it was retrained since, or another
    ``--sorce_saveEpoch`` names another file). Only that: the component's own flags are
    those of the run that made it. Stage 1 checks its whole recipe; ``--stage target``
    alone calls this."""
    learnt = record.get("recipe", {}).get("teachers", {})
    changed = []
    for teacher in task.teachers[attribute]:
        if teacher.name in learnt and teacher.path.exists():
            net, _ = load_net(teacher.path, kind="source")
            digest = weights_digest(net.state_dict())
            if digest != learnt[teacher.name]:
                changed.append(f"teachers.{teacher.name}: {learnt[teacher.name]} -> {digest}")
    if changed:
        raise KamalError(f"component {task.name}/{attribute}: {path} learnt from other teacher "
                         f"weights than this run names ({'; '.join(changed)}: retrained since, or "
                         f"another --sorce_saveEpoch); retrain it with: python train.py "
                         f"{task_flags(task, cfg)} --stage component --overwrite (and the flags "
                         "it was trained with)")


def train_target(task: Task, cfg: RunConfig, data: TaskData | None = None,
                 verify_components: bool = False) -> Path:
    """Stage 2: the multi-head target net from all component nets of ``task``;
    ``verify_components``: first check each component against its teachers on disk (when
    stage 1 did not just do so)."""
    components, digests, paths = [], {}, []
    for attribute in task.attributes:
        folder = component_dir(cfg.components_root, task.name, cfg.variant, attribute)
        path = saved_epoch(folder, cfg.component_epochs, "--component_saveEpoch")
        if path is None:
            raise KamalError(f"component net {epoch_file(folder, cfg.component_epochs)} missing; "
                             f"train it with: python train.py {task_flags(task, cfg)} --stage component")
        net, record = load_net(path, kind="component", attribute=attribute, image_size=cfg.image_size)
        if verify_components:
            check_component_teachers(task, attribute, path, record, cfg)
        log.info("  component %s: %s", attribute, path)
        components.append(net)
        paths.append(str(path))
        digests[attribute] = weights_digest(net.state_dict())
    recipe = make_recipe(cfg, "target", cfg.amalgamation_optim, cfg.target_epochs, cfg.seed,
                         cfg.target_arch, group=task.name, attributes=list(task.attributes),
                         width=cfg.target_width, feature_loss=cfg.feature_loss, components=digests)
    name = f"target {task.name}"
    plan = plan_net(target_dir(cfg.target_root, task.name, cfg.variant), cfg.target_epochs,
                    recipe, cfg, name, RETRAIN_AMALGAMATION)
    if plan.done:
        log.info("%s: %s exists, reusing it (same recipe)", name, plan.final)
        return plan.final
    seed_everything(cfg.seed)
    student = AttributeResNet(task.attributes, cfg.target_width, cfg.target_arch)
    method = TargetAmalgamation(student, components, cfg.feature_loss)
    log.info("%s (%s): %s width %d, %.1fM parameters, heads %s", name, cfg.variant,
             cfg.target_arch, cfg.target_width,
             sum(p.numel() for p in student.parameters()) / 1e6, ", ".join(task.attributes))
    record = {"kind": "target", "group": task.name, "variant": cfg.variant, "components": paths}
    data = data or TaskData(task, cfg)
    return train_net(method, plan, recipe, cfg, name, cfg.target_epochs, cfg.amalgamation_optim,
                     cfg.seed, data.train, data.val,
                     cfg.log_dir / "target" / task.name / cfg.variant, record)


def make_demo_teachers(cfg: RunConfig, group: str, attributes: Sequence[str] | None,
                       name: str | None) -> None:
    """The one-command demo makes whatever teachers are missing: the group's table nets, or
    for ``attributes`` those of :func:`~kamal_attr.pool.demo_teachers`. They stand in for
    published nets: the demo preset's, whatever the student's --arch, --width, --lr or
    --batch_size (a --sorce_saveEpoch they lack is reported as such)."""
    demo_sources = dataclasses.replace(
        cfg, width=DEMO.width, source_batch_size=DEMO.source_batch_size,
        source_epochs=DEMO.source_epochs, source_optim=dataclasses.replace(DEMO.source_optim),
        overwrite=False, arch="resnet18")
    if attributes:
        for spec, arch in demo_teachers(*named_attributes(attributes, name)):
            train_source_net(spec, dataclasses.replace(demo_sources, arch=arch))
    else:
        for spec in source_nets_of(group):
            train_source_net(spec, demo_sources)


def amalgamate(cfg: RunConfig, group: str, attributes: Sequence[str] | None = None,
               name: str | None = None, stage: str = "all", task: Task | None = None) -> Task:
    """What ``train.py`` does after its checks: in the demo, make the missing teachers; then
    stage 1 (every component of the task) and stage 2 (its target), as ``stage`` says.
    Returns the task (a preset ``group``, or ``attributes`` taught by the pool). Outside the
    demo, a ``task`` the caller has already selected and checked is used as it is (one pool
    scan); the demo selects its task once the missing teachers are made."""
    if cfg.demo and task is not None:
        raise ValueError("the demo selects its task after making its teachers: pass no task")
    if cfg.demo:
        make_demo_teachers(cfg, group, attributes, name)
    if task is None:
        task = select_task(group, attributes, name, cfg.sources_root, cfg.source_save_epoch,
                           need_teachers=stage != "target")
    data = TaskData(task, cfg)  # decoded once, shared by the components and the target
    if stage in ("component", "all"):
        for attribute in task.attributes:
            train_component(task, attribute, cfg, data)
    if stage in ("target", "all"):
        train_target(task, cfg, data, verify_components=stage == "target")
    return task
