"""Run settings: the real-CelebA defaults of METHOD.md, the CPU demo preset, and paths.

Scripts parse flags whose defaults are ``None`` and call :func:`resolve_config`, which fills
every unset flag from the preset (``--demo`` or real data). Output roots are resolved
against ``--save_root`` (default: the repository), and demo artefacts live in ``demo/``
sub-folders so they never mix with real-data ones.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import KamalError
from .cli import ArgumentParser
from .engine import OptimConfig
from .models import ARCHS

REPO_ROOT = Path(__file__).resolve().parent.parent
SELECTIONS = ("entropy", "average", "random")


def bounded_int(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``, else one line saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, got {value}")
        return value
    return parse


def learning_rate(text: str) -> float:
    """An argparse ``type``: a finite learning rate in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be a finite number in (0, 1], got {text}")
    return value


#: Flag value ranges, checked at parse time. 32 px is the smallest input whose layer4 map
#: is not empty; bridges map a tap of C channels to C/2, so a width below 2 has none; a
#: training batch of one breaks BatchNorm; numpy seeds are below 2**32, and source net k
#: trains with seed + 1000 k (k <= 99 leaves room for any pool).
POSITIVE = bounded_int(1)
IMAGE_SIZE = bounded_int(32, why=" (ResNet-18 downsamples by 32)")
WIDTH = bounded_int(2, why=" (bridges halve the channels)")
BATCH_SIZE = bounded_int(2, why=" (BatchNorm needs two images)")
WORKERS = bounded_int(0)
SEED = bounded_int(0, 2**32 - 1 - 1000 * 99)


@dataclass(frozen=True)
class Preset:
    data_root: str
    image_size: int
    width: int
    target_width: int
    batch_size: int
    source_batch_size: int  # of train_sourcenet.py unless --batch_size is given
    workers: int | None  # None: the cores
    pretrained: str
    source_epochs: int
    source_save_epoch: int
    source_optim: OptimConfig
    component_epochs: int
    target_epochs: int
    amalgamation_optim: OptimConfig
    split_train_among_sources: bool  # demo: an attribute's S source nets train on parts 1..S of S
    subfolder: str


#: METHOD.md's settings for real CelebA (224 px, ImageNet init, 50 epochs, x0.5 at 5..25).
REAL = Preset(
    data_root="data/CelebA", image_size=224, width=64, target_width=90, batch_size=64,
    source_batch_size=64, workers=None, pretrained="auto", source_epochs=50, source_save_epoch=40,
    source_optim=OptimConfig("sgd", 1e-4, weight_decay=5e-4, schedule="step"),
    component_epochs=50, target_epochs=50,
    amalgamation_optim=OptimConfig("adam", 1e-4, schedule="step"),
    split_train_among_sources=False, subfolder="")

#: The CPU demo: synthetic data at 64 px, width-16 nets (target 24), short cosine schedules;
#: the source nets of an attribute split the training split (style-skewed thirds) among them.
#: Teachers take batches of 16: on a third of the 4800 training images, 4 epochs of 64 are
#: 100 steps (148 on a half), too few for the small cues of the eye and face attributes
#: (Oval_Face stayed at its baseline).
#: Components and target take batches of 32 for 8 and 12 epochs (1200 and 1800 steps): with
#: 64 for 6 and 8 they under-fit their teachers' signal, as far below it on the training
#: images as on the test images (the report's train-split check; face seed 3256: Oval_Face's
#: target 78.1 -> 82.0 against its component's 84.1).
DEMO = Preset(
    data_root="data/synthetic", image_size=64, width=16, target_width=24, batch_size=32,
    source_batch_size=16, workers=0, pretrained="none", source_epochs=4, source_save_epoch=4,
    source_optim=OptimConfig("adam", 1e-3, schedule="cosine"),
    component_epochs=8, target_epochs=12,
    amalgamation_optim=OptimConfig("adam", 1e-3, schedule="cosine"),
    split_train_among_sources=True, subfolder="demo")


@dataclass
class RunConfig:
    """Everything a stage needs, resolved (no ``None`` left)."""

    data_root: Path
    sources_root: Path
    routing_root: Path
    components_root: Path
    target_root: Path
    log_dir: Path
    weights_dir: Path
    image_size: int
    width: int
    target_width: int
    batch_size: int
    source_batch_size: int
    workers: int
    arch: str  # of the nets a script trains: source nets, or component nets (train.py)
    target_arch: str
    cache_dir: Path
    use_cache: bool
    bf16: bool
    pretrained: str
    seed: int
    device: str
    source_epochs: int
    source_save_epoch: int
    source_optim: OptimConfig
    component_epochs: int
    target_epochs: int
    amalgamation_optim: OptimConfig
    split_train_among_sources: bool
    selection: str = "entropy"
    feature_loss: bool = True
    penalty: bool = True
    demo: bool = False
    overwrite: bool = False
    args: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """Names an amalgamation recipe; ablations get folders of their own."""
        return (self.selection + ("" if self.feature_loss else "-logits")
                + ("" if self.penalty or not self.feature_loss else "-nopenalty"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers() -> int:
    """DataLoader workers: this process's share of the cores (torchrun starts one process
    per GPU on the same cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by all scripts (defaults ``None``: filled from the preset)."""
    g = p.add_argument_group("data and outputs")
    g.add_argument("--demo", action="store_true",
                   help="CPU demo: synthetic data (generated on first use), small nets")
    g.add_argument("--data_root", help="CelebA folder (default data/CelebA; demo data/synthetic)")
    g.add_argument("--save_root", default=None,
                   help="base folder of all relative output roots (default: the repository)")
    g.add_argument("--sourcenets_root", help="source nets (default snapshot/sources/)")
    g.add_argument("--log_dir", help="TensorBoard runs and log.txt (default run/)")
    g.add_argument("--weights_dir", default=None,
                   help="torchvision's ImageNet .pth files, found by architecture "
                        "(resnet18-*.pth...; default weights/resnet/)")
    g = p.add_argument_group("run")
    g.add_argument("--image_size", type=IMAGE_SIZE, help="input size, >= 32 (224; demo 64)")
    g.add_argument("--batch_size", type=BATCH_SIZE,
                   help=f"batch size, >= 2 ({REAL.batch_size}; demo {DEMO.batch_size} in train.py, "
                        f"{DEMO.source_batch_size} in train_sourcenet.py)")
    g.add_argument("--workers", type=WORKERS,
                   help="DataLoader workers (default: the cores, shared by torchrun's processes; demo 0)")
    g.add_argument("--cache_dir", help="decoded-image caches (default data/cache/, keyed by the "
                   "dataset's lists and the image size; made by "
                   "python -m kamal_attr.imagecache, and by the demo itself)")
    g.add_argument("--no_cache", action="store_true",
                   help="read the JPEGs even when a decoded-image cache exists")
    g.add_argument("--fp32", action="store_true",
                   help="on CUDA, train and predict in float32 (default: bfloat16 autocast)")
    g.add_argument("--seed", type=SEED, default=3256, help="seed of python, numpy, torch, loaders")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda if present)")
    g.add_argument("--overwrite", action="store_true",
                   help="retrain nets whose final checkpoint exists (default: reuse them)")


def add_task_args(g: argparse._ArgumentGroup) -> None:
    """Flags that name a task (``train.py``, ``evaluate.py``): a preset group, or any
    attribute set taught by the teacher pool."""
    g.add_argument("--target_attribute", help="preset group: hair, eye or face "
                   "(default hair; METHOD.md's source nets)")
    g.add_argument("--attributes", nargs="+", metavar="ATTRIBUTE",
                   help="instead: any CelebA attributes, each taught by every source net under "
                        "--sourcenets_root with a head for it (the teacher pool)")
    g.add_argument("--name", help="with --attributes: the task's folder name (default: the "
                   "attributes joined by '-')")


def add_amalgamation_args(g: argparse._ArgumentGroup) -> None:
    """Flags that name which amalgamated nets to train or evaluate (``train.py``,
    ``evaluate.py``): checkpoint epochs, output roots and the recipe variant."""
    g.add_argument("--sorce_saveEpoch", "--source_save_epoch", dest="source_save_epoch", type=POSITIVE,
                   help="epoch of the source-net checkpoints to use "
                        f"({REAL.source_save_epoch}; demo {DEMO.source_save_epoch})")
    g.add_argument("--component_saveEpoch", "--component_save_epoch", dest="component_save_epoch",
                   type=POSITIVE, help="epochs of component training; that checkpoint feeds stage 2 "
                        f"({REAL.component_epochs}; demo {DEMO.component_epochs})")
    g.add_argument("--target_epoch", type=POSITIVE, help="epochs of target training "
                   f"({REAL.target_epochs}; demo {DEMO.target_epochs})")
    g.add_argument("--sourcedata_txtroot", help="routing lists, one per source net (default data/sources/)")
    g.add_argument("--componentnets_root", help="component nets (default snapshot/components/)")
    g.add_argument("--target_root", help="target nets (default snapshot/target/)")
    g.add_argument("--selection", choices=SELECTIONS, default="entropy",
                   help="which teacher each image learns from: min entropy (paper), all averaged, "
                        "or a fixed random one (ablations)")
    g.add_argument("--no_feature_loss", action="store_true", help="logits only (ablation)")
    g.add_argument("--no_penalty", action="store_true",
                   help="no unit-norm penalty on the source-side bridges (ablation: both sides "
                        "of a bridge may shrink together; their output norms are logged)")


def check_device(name: str) -> str:
    """``name`` if torch knows it and it exists here (``cuda:7`` on a one-GPU machine does not)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KamalError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:0...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KamalError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise KamalError(f"--device {name}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise KamalError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise KamalError(f"--device {name}: only cpu, cuda[:N] and mps are supported")
    return name


def cache_root(save_root: str | None, cache_dir: str | None) -> Path:
    """Where decoded-image caches live: ``cache_dir`` (default ``data/cache``) under
    ``save_root`` or the repository, as every output flag; the same in the scripts and in
    ``python -m kamal_attr.imagecache``, so that a cache built there is found."""
    return (Path(save_root) if save_root else REPO_ROOT) / (cache_dir or "data/cache")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Fill unset flags from the preset and resolve paths; validate values."""
    preset = DEMO if args.demo else REAL
    base = Path(args.save_root) if args.save_root else REPO_ROOT
    sub = preset.subfolder

    def out_root(flag: str, default: str) -> Path:
        """``--flag`` if given, else ``default`` with the preset's sub-folder after its first
        part (``snapshot/sources`` -> ``snapshot/demo/sources``), under ``base``."""
        value = getattr(args, flag, None)
        if value:
            return base / value
        first, *rest = default.split("/")
        return base / first / sub / "/".join(rest)

    get = lambda flag, default: default if getattr(args, flag, None) is None else getattr(args, flag)  # noqa: E731
    source_optim = replace(preset.source_optim)
    amalgamation_optim = replace(preset.amalgamation_optim)
    if getattr(args, "lr", None) is not None:
        source_optim.lr = amalgamation_optim.lr = args.lr
    if getattr(args, "optimizer", None):
        source_optim.optimizer = amalgamation_optim.optimizer = args.optimizer
    if getattr(args, "schedule", None):
        source_optim.schedule = amalgamation_optim.schedule = args.schedule
    source_epochs = get("epochs", preset.source_epochs)
    save_epoch = get("source_save_epoch", min(preset.source_save_epoch, source_epochs))
    data_root = Path(args.data_root) if args.data_root else REPO_ROOT / preset.data_root
    device = check_device(args.device or default_device())
    device_type = torch.device(device).type
    cfg = RunConfig(
        data_root=data_root,
        sources_root=out_root("sourcenets_root", "snapshot/sources"),
        routing_root=out_root("sourcedata_txtroot", "data/sources"),
        components_root=out_root("componentnets_root", "snapshot/components"),
        target_root=out_root("target_root", "snapshot/target"),
        log_dir=out_root("log_dir", "run"),
        weights_dir=Path(args.weights_dir) if args.weights_dir else REPO_ROOT / "weights" / "resnet",
        image_size=get("image_size", preset.image_size),
        width=get("width", preset.width),
        target_width=get("target_width", preset.target_width),
        batch_size=get("batch_size", preset.batch_size),
        source_batch_size=get("batch_size", preset.source_batch_size),
        workers=get("workers", preset.workers if preset.workers is not None else default_workers()),
        arch=get("arch", "resnet18"),
        target_arch=get("target_arch", "resnet18"),
        cache_dir=cache_root(args.save_root, getattr(args, "cache_dir", None)),
        use_cache=not getattr(args, "no_cache", False),
        bf16=device_type == "cuda" and not getattr(args, "fp32", False),
        pretrained=get("pretrained", preset.pretrained),
        seed=args.seed,
        device=device,
        source_epochs=source_epochs,
        source_save_epoch=save_epoch,
        source_optim=source_optim,
        component_epochs=get("component_save_epoch", preset.component_epochs),
        target_epochs=get("target_epoch", preset.target_epochs),
        amalgamation_optim=amalgamation_optim,
        split_train_among_sources=preset.split_train_among_sources,
        selection=get("selection", "entropy"),
        feature_loss=not getattr(args, "no_feature_loss", False),
        penalty=not getattr(args, "no_penalty", False),
        demo=args.demo,
        overwrite=args.overwrite,
        args={k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool))},
    )
    return cfg


def amalgamation_parser(description: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of ``train.py`` (also what :mod:`kamal_attr.report` runs)."""
    p = ArgumentParser(description=description, add_help=add_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("amalgamation")
    add_task_args(g)
    g.add_argument("--stage", choices=["component", "target", "all"], default="all")
    add_amalgamation_args(g)
    g.add_argument("--lr", type=learning_rate,
                   help="learning rate of nets and bridges, in (0, 1] (1e-4; demo 1e-3)")
    g.add_argument("--schedule", choices=["step", "cosine"],
                   help="per-epoch schedule of nets and bridges: x0.5 at 5,10,...,25 (step, "
                        "the paper) or cosine (demo)")
    g.add_argument("--arch", choices=list(ARCHS), help="component nets' architecture (resnet18)")
    g.add_argument("--width", type=WIDTH, help="component net base width (64; demo 16)")
    g.add_argument("--target_arch", choices=list(ARCHS), help="target net's architecture (resnet18)")
    g.add_argument("--target_width", type=WIDTH, help="target net base width (90; demo 24)")
    add_common_args(p)
    return p
