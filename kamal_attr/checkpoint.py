"""Checkpoint files: where they live, how they are written (atomically) and read (safely).

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(...,
weights_only=True)`` reads it: loading a downloaded teacher never runs code. Every file
records what it holds (``kind``, attribute names in head order, architecture, width, input
size and normalisation, epoch) so later stages can validate teachers before training.

Layout under the roots (``{root}/{group}/...``)::

    sources:    {sourcenets_root}/hair/source1_Black_Hair/epoch_040.pth
    components: {componentnets_root}/hair/entropy/Black_Hair/epoch_050.pth
    target:     {target_root}/hair/entropy/epoch_050.pth
    resume:     last.pth beside the epoch files (adds optimizer and scheduler state)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import KamalError
from .attributes import SourceNetSpec
from .celeba import IMAGENET_MEAN, IMAGENET_STD
from .models import AttributeResNet

FORMAT = "kamal_attr/1"
KINDS = ("source", "component", "target")


def epoch_file(folder: Path, epoch: int) -> Path:
    return folder / f"epoch_{epoch:03d}.pth"


def source_dir(root: str | Path, spec: SourceNetSpec) -> Path:
    return Path(root) / spec.group / spec.name


def component_dir(root: str | Path, group: str, variant: str, attribute: str) -> Path:
    return Path(root) / group / variant / attribute


def target_dir(root: str | Path, group: str, variant: str) -> Path:
    return Path(root) / group / variant


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``:
    a crash mid-write never leaves a truncated checkpoint under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def net_record(kind: str, model: AttributeResNet, image_size: int, epoch: int,
               **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of one net: its weights and what they are."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    return {"format": FORMAT, "kind": kind, "arch": "resnet18", "width": model.width,
            "attributes": list(model.attributes), "image_size": image_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` on the CPU; one clear error if it fails."""
    path = Path(path)
    if not path.is_file():
        raise KamalError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KamalError(f"cannot load checkpoint {path} (weights_only): "
                         f"{str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise KamalError(f"{path} is not a kamal_attr checkpoint (no '{FORMAT}' record)")
    return ckpt


def load_net(path: str | Path, kind: str | None = None, attribute: str | None = None,
             image_size: int | None = None) -> tuple[AttributeResNet, dict[str, Any]]:
    """Build the net a checkpoint describes and load its weights.

    Checks, naming the file: ``kind`` matches, ``attribute`` is one of its heads, and it was
    trained at ``image_size``. Returns ``(model, record)``; the model is on the CPU in eval mode.
    """
    ckpt = load_checkpoint(path)
    if kind is not None and ckpt["kind"] != kind:
        raise KamalError(f"{path} holds a {ckpt['kind']} net, expected a {kind} net")
    if attribute is not None and attribute not in ckpt["attributes"]:
        raise KamalError(f"{path} has no head for {attribute} (it has {ckpt['attributes']})")
    if image_size is not None and ckpt["image_size"] != image_size:
        raise KamalError(f"{path} was trained at {ckpt['image_size']} px, this run uses "
                         f"{image_size} px; pass --image_size {ckpt['image_size']}")
    model = AttributeResNet(ckpt["attributes"], ckpt["width"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise KamalError(f"{path}: weights do not match its record: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval(), ckpt
