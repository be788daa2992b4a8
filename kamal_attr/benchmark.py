"""How fast each stage trains, how fast data arrives, and what that means for the paper's
protocol: one line per target of issue 9, measured in one run.

    python -m kamal_attr.benchmark                   # CPU: demo sizes, under a minute
    python -m kamal_attr.benchmark --device cuda     # GPU: 224 px, real-data widths
    python -m kamal_attr.benchmark --compile         # also each stage under torch.compile

Measured, at the demo's sizes (64 px, width 16, target 24; batch 64, the real preset's) or the real-data
preset's (224 px, width 64, target 90) with ``--real_sizes`` (the default on CUDA):

- every stage's training step on random images (``forward_train`` + backward + fused
  optimiser, as :func:`kamal_attr.engine.train_one_epoch` runs it: channels-last, bf16
  autocast on CUDA), a plain supervised step of the same student for the ratios of
  target 4, and both amalgamation stages without their feature loss, which splits a
  stage's cost into its teachers' forward passes and its feature loss. Steps are timed in
  interleaved rounds and the median taken, so that a machine's drift between
  measurements does not enter a ratio. With ``--compile``, each stage's step also under
  ``torch.compile`` (inductor; target 3's "if it helps"), in the same rounds;
- the training loader (:func:`kamal_attr.runtime.train_loader`) over a freshly drawn
  synthetic dataset at CelebA's 178x218, reading the decoded-image cache (and the JPEGs,
  for comparison);
- the paper's protocol (22 source nets, 10 component nets, 3 target nets, 50 epochs on
  162,770 training images, val evaluation every epoch) extrapolated from each stage's
  img/s at 224 px, widths 64/90, data loading included (the slower of step and loader).

Exits 1 when a CPU ratio of target 4 falls short of its threshold.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

from . import KamalError
from .attributes import GROUPS, source_nets_of
from .cli import ArgumentParser, run
from .config import (DEMO, REAL, RunConfig, add_common_args, bounded_int, check_device,
                     default_device, default_workers, resolve_config)
from .engine import OptimConfig, autocast, build_optimizer, place
from .imagecache import build_cache
from .methods import Method, SelectiveAmalgamation, SourceTraining, TargetAmalgamation
from .models import AttributeResNet
from .runtime import configure_device, dataset, train_loader
from .synthetic import generate, split_sizes

#: The paper's protocol (METHOD.md): nets per stage, epochs, CelebA's train and val sizes.
PROTOCOL = {"source nets": 22, "component nets": 10, "target nets": 3}
EPOCHS, TRAIN_IMAGES, VAL_IMAGES = 50, 162_770, 19_867
#: Target 4's thresholds (CPU): a stage's step rate over the plain step of its student.
RATIO_TARGETS = {"stage 1": 0.65, "stage 2": 0.5}
#: Batches of image indices a step cycles through, so that stage 1's chunk sizes (images per
#: source net) change from step to step as in training, where a compiled step recompiles
#: for new sizes until its shapes are dynamic.
PLANS = 8


def build_step(method: Method, device: torch.device, image_size: int, batch: int,
               bf16: bool, compiled: bool = False) -> Callable[[], None]:
    """One training step of ``method`` on a fixed random batch, as the training loop runs it;
    each call takes the next of :data:`PLANS` batches of indices (routing rows). ``compiled``:
    with ``torch.compile(method)``, which the training loop does not do."""
    place(method, device).train()
    run = torch.compile(method) if compiled else method
    optimizer = build_optimizer(method.parameter_groups(1e-3), OptimConfig("adam", 1e-3))
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(batch, len(method.student.attributes), dtype=torch.long, device=device)
    indices = itertools.cycle(torch.arange(PLANS * batch).split(batch))

    def step() -> None:
        with autocast(device, bf16):
            loss = torch.stack(list(run(images, labels, next(indices)).values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def steps_per_second(steps: dict[str, Callable[[], None]], device: torch.device, batch: int,
                     rounds: int, per_round: int) -> dict[str, list[float]]:
    """img/s of every step, measured in ``rounds`` interleaved rounds, after each step has
    run every batch plan once (so that neither cuDNN's autotuning for a new chunk size nor a
    compiled step's recompilation falls into a timed round)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(PLANS):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            sync()
            rates[name].append(per_round * batch / (time.perf_counter() - start))
    return rates


def stage_methods(width: int, target_width: int, batch: int) -> dict[str, Callable[[], Method]]:
    """Fresh methods (random weights) shaped like the hair group's nets: the plain steps of
    target 4's ratios, the three stages (stage 1 with Brown_Hair's 3 source nets, stage 2
    with the 4 components) and the two amalgamation stages without their feature loss,
    which split a stage's cost into its teachers' forward passes and its feature loss."""
    brown = source_nets_of("hair", "Brown_Hair")
    choice = torch.randint(0, len(brown), (PLANS * batch,))  # a source net per image
    routing = torch.nn.functional.one_hot(choice, len(brown))
    hair = GROUPS["hair"]

    def stage1(feature_loss: bool = True) -> Method:
        return SelectiveAmalgamation(AttributeResNet(["Brown_Hair"], width),
                                     [AttributeResNet(s.attributes, width) for s in brown],
                                     "Brown_Hair", routing, feature_loss=feature_loss)

    def stage2(feature_loss: bool = True) -> Method:
        return TargetAmalgamation(AttributeResNet(hair, target_width),
                                  [AttributeResNet([a], width) for a in hair], feature_loss)
    return {
        "plain student": lambda: SourceTraining(AttributeResNet(["Brown_Hair"], width)),
        "stage 1": stage1,
        "stage 1, logits only": lambda: stage1(feature_loss=False),
        "plain target": lambda: SourceTraining(AttributeResNet(hair, target_width)),
        "stage 2": stage2,
        "stage 2, logits only": lambda: stage2(feature_loss=False),
        "source net": lambda: SourceTraining(AttributeResNet(brown[1].attributes, width)),
    }


#: The steps that train the paper's nets, timed compiled too with ``--compile`` (target 3).
STAGES = ("source net", "stage 1", "stage 2")


def measure_steps(device: torch.device, image_size: int, width: int, target_width: int,
                  batch: int, bf16: bool, rounds: int, per_round: int,
                  compiled: bool = False) -> dict[str, float]:
    """Median img/s of each step of :func:`stage_methods`, and each amalgamation step's
    ratio to the plain step of its student (target 4), with and without its feature loss,
    and its number of teachers. ``compiled``: each of :data:`STAGES` is also timed under
    ``torch.compile`` (``"<stage>, compiled"``, in the same rounds) and its speed-up over
    the eager step is given (``"<stage> compile speed-up"``)."""
    torch.manual_seed(0)
    makers = stage_methods(width, target_width, batch)
    methods, steps = {}, {}
    for name, make in makers.items():
        methods[name] = make()
        steps[name] = build_step(methods[name], device, image_size, batch, bf16)
    for name in STAGES if compiled else ():
        steps[f"{name}, compiled"] = build_step(makers[name](), device, image_size, batch, bf16,
                                                compiled=True)
    rates = steps_per_second(steps, device, batch, rounds, per_round)
    out = {name: statistics.median(r) for name, r in rates.items()}
    for stage, plain in (("stage 1", "plain student"), ("stage 2", "plain target")):
        for step in (stage, f"{stage}, logits only"):
            out[f"{step} ratio"] = statistics.median(s / p for s, p in zip(rates[step], rates[plain]))
        out[f"{stage} teachers"] = len(methods[stage].teachers)
    for name in STAGES if compiled else ():
        out[f"{name} compile speed-up"] = statistics.median(
            c / e for c, e in zip(rates[f"{name}, compiled"], rates[name]))
    return out


def compile_rows(steps: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """Target 3's ``torch.compile`` rows: each stage's compiled step rate over its eager
    one. Training compiles nothing: a gain under 5 % is within this benchmark's noise."""
    if "stage 1 compile speed-up" not in steps:
        return [("3 torch.compile step / eager step", "-", ">= 1.05",
                 "not measured: --compile (compiling takes minutes)")]
    rows = []
    for name in STAGES:
        gain = steps[f"{name} compile speed-up"]
        rows.append((f"3 torch.compile step / eager step, {name}", f"{gain:.3f}", ">= 1.05",
                     "helps" if gain >= 1.05 else "slower" if gain <= 0.95 else "no gain"))
    return rows


def cost_split(steps: dict[str, float], stage: str, threshold: float) -> str:
    """A stage step's time in plain steps of its student: 1 (the student's own forward and
    backward) + what its teachers add without the feature loss (their forward passes, the
    logit loss and, in stage 1, sorting the batch by teacher) + its feature loss, and what
    target 4 allows beyond the 1: ``1/ratio - 1`` at the threshold."""
    full, logits = steps[f"{stage} ratio"], steps[f"{stage}, logits only ratio"]
    teachers = f"{steps[f'{stage} teachers']:.0f} {'source' if stage == 'stage 1' else 'component'} nets"
    return (f"{stage} step = 1 + {1 / logits - 1:.2f} ({teachers}' forward, logit loss) + "
            f"{1 / full - 1 / logits:.2f} (feature loss) plain steps; "
            f"target 4 allows 1 + {1 / threshold - 1:.2f}")


def loader_rate(cfg: RunConfig, use_cache: bool, batches: int) -> float:
    """img/s of the training loader (order, views, transfer to the device) alone."""
    run_cfg = dataclasses.replace(cfg, use_cache=use_cache)
    loader = train_loader(run_cfg, dataset(run_cfg, "train", ["Smiling"], train=True), seed=0)
    loader.sampler.set_epoch(1)
    seen, start = 0, None
    for i, (images, _, _) in enumerate(loader):
        if i == 1:  # after the first batch: workers started
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        seen += images.shape[0]
        if i == batches:
            break
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def protocol_hours(rates: dict[str, float], loader: float) -> tuple[float, dict[str, float]]:
    """Hours of the paper's protocol at the measured img/s (each stage no faster than the
    loader; evaluation counted as a third of a training step per image)."""
    source, stage1, stage2 = (min(rates[k], loader) for k in ("source net", "stage 1", "stage 2"))
    images = EPOCHS * TRAIN_IMAGES
    val = EPOCHS * VAL_IMAGES / 3
    hours = {"source nets": PROTOCOL["source nets"] * (images + val) / source,
             "component nets": PROTOCOL["component nets"] * (images + val) / stage1,
             "target nets": PROTOCOL["target nets"] * (images + val) / stage2}
    hours = {k: v / 3600 for k, v in hours.items()}
    return sum(hours.values()), hours


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--real_sizes", action="store_true",
                   help="224 px, widths 64/90 for the ratios too (default on CUDA)")
    p.add_argument("--rounds", type=bounded_int(1), default=5)
    p.add_argument("--batch_size", type=bounded_int(2), default=64)
    p.add_argument("--fp32", action="store_true", help="on CUDA: no bf16 autocast")
    p.add_argument("--images", type=bounded_int(600), default=1200,
                   help="size of the synthetic dataset the loader is timed on")
    p.add_argument("--compile", action="store_true",
                   help="also time each stage's step under torch.compile (target 3)")
    args = p.parse_args(argv)
    train_images = split_sizes(args.images)[0]
    if train_images < 3 * args.batch_size:  # the loader is timed from its second batch on
        raise KamalError(f"--images {args.images} makes {train_images} training images, fewer "
                         f"than 3 batches of --batch_size {args.batch_size}: pass --images "
                         f"{5 * args.batch_size} or more")  # 60 % of the images train
    device = torch.device(check_device(args.device))
    cuda = device.type == "cuda"
    bf16 = cuda and not args.fp32
    configure_device(device)  # as training: current device, cudnn.benchmark, no TF32
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}, torchvision {torchvision.__version__}; "
          f"{'bf16 autocast' if bf16 else 'float32'}, channels-last, fused optimiser"
          + (", cudnn.benchmark" if cuda else ""))
    demo = not (cuda or args.real_sizes)
    size, width, target_width = ((DEMO.image_size, DEMO.width, DEMO.target_width) if demo else
                                 (REAL.image_size, REAL.width, REAL.target_width))
    batch = args.batch_size
    print(f"steps at {size} px, width {width}, target {target_width}, batch {batch} "
          f"({args.rounds} interleaved rounds, median):")
    steps = measure_steps(device, size, width, target_width, batch, bf16, args.rounds,
                          per_round=5 if demo else 2, compiled=args.compile)
    shown = ["source net", "plain student", "stage 1", "stage 1, logits only", "plain target",
             "stage 2", "stage 2, logits only"]
    if args.compile:
        shown += [f"{name}, compiled" for name in STAGES]
    for k in shown:
        print(f"  {k:20s} {steps[k]:8.0f} img/s")

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "celeba", num_images=args.images, seed=0)
        flags = argparse.ArgumentParser()
        add_common_args(flags)
        cfg = resolve_config(flags.parse_args(
            ["--data_root", str(root), "--save_root", tmp, "--device", str(device),
             "--image_size", str(size), "--batch_size", str(batch), "--cache_dir", "cache"]
            + ["--demo"] * demo + ["--fp32"] * args.fp32))
        build_cache(root, size, cfg.cache_dir)
        batches = max(3, min(40, int(0.6 * args.images) // batch - 1))
        cached = loader_rate(cfg, True, batches)
        jpeg = loader_rate(dataclasses.replace(cfg, workers=default_workers()), False, batches)
    fastest = max(steps[k] for k in STAGES)
    print(f"loader at {size} px: {cached:.0f} img/s from the decoded-image cache "
          f"({cfg.workers} workers), {jpeg:.0f} img/s from JPEGs ({default_workers()} workers)")

    rows, short = [], []
    for stage, threshold in RATIO_TARGETS.items():
        ratio = steps[f"{stage} ratio"]
        met = ratio >= threshold
        if not cuda and not met:
            short.append(stage)
        rows.append((f"4 {stage} step / plain step of its student", f"{ratio:.3f}",
                     f">= {threshold}" + ("" if not cuda else " (CPU)"),
                     "met" if met else "SHORT"))
    rows.append(("2 loader img/s / fastest stage img/s", f"{cached / fastest:.2f}", ">= 1.5",
                 "met" if cached >= 1.5 * fastest else "SHORT"))
    rows += compile_rows(steps)
    if demo:
        rows.append(("1 paper protocol on one GPU", "-", "<= 8 h",
                     "not measured: run with --device cuda (224 px, widths 64/90)"))
    else:
        total, parts = protocol_hours(steps, cached)
        rows.append((f"1 paper protocol on this {'GPU' if cuda else 'device'}", f"{total:.1f} h",
                     "<= 8 h", ("met" if total <= 8 else "SHORT") + " (" + ", ".join(
                         f"{k} {v:.1f} h" for k, v in parts.items()) + ")"))
    print(f"{'target':46s} {'figure':>8s}  {'threshold':12s} result")
    for row in rows:
        print(f"{row[0]:46s} {row[1]:>8s}  {row[2]:12s} {row[3]}")
    for stage, threshold in RATIO_TARGETS.items():
        print(cost_split(steps, stage, threshold))
    if short:
        print(f"short of target 4 on the CPU: {', '.join(short)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run(lambda: sys.exit(main()))
