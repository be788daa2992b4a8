"""Use a student: each attribute's probability for every image given, as CSV.

    python -m kamal_attr.predict --checkpoint snapshot/target/hair/entropy/epoch_050.pth \\
        photos/ me.jpg --out predictions.csv

Any checkpoint of this project works (target, component or source net): its record says
its attributes, input size and normalisation, and every image gets the eval view the net
was validated on (``Resize(S * 256/224)`` + ``CenterCrop(S)``). Folders are searched
recursively for images; rows follow the sorted file order. Batched, on CUDA when present.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from . import KamalError
from .celeba import eval_geometry, load_image
from .checkpoint import atomic_write_text, check_output_path, load_net
from .cli import ArgumentParser, run
from .config import WORKERS, bounded_int, check_device, default_device
from .engine import predict

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Every file given, and every image under every folder given (sorted, recursive)."""
    images = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                           and p.is_file())
            if not found:
                raise KamalError(f"{path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise KamalError(f"{path}: no such file or folder")
    return images


class ImageFiles(Dataset):
    """Images as the net's eval view: ``(image, 0, index)``, the loaders' batch layout."""

    def __init__(self, files: Sequence[Path], image_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.files = list(files)
        self.view = transforms.Compose([eval_geometry(image_size), transforms.ToTensor(),
                                        transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.view(load_image(self.files[index])), 0, index


def predict_images(checkpoint: Path, images: Sequence[Path], device: str = "cpu",
                   batch_size: int = 64, workers: int = 0) -> tuple[list[str], torch.Tensor]:
    """``(attributes, probabilities (N, attributes))``: softmax of each head, class 1 (the
    attribute is present), for every image in order."""
    net, record = load_net(checkpoint)
    data = ImageFiles(images, record["image_size"], record["mean"], record["std"])
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, shuffle=False,
                        pin_memory=torch.device(device).type == "cuda")
    logits, _ = predict(net, loader, torch.device(device), desc="predicting")
    return list(net.attributes), logits.softmax(-1)[..., 1]


def write_csv(out, images: Sequence[Path], attributes: Sequence[str],
              probabilities: torch.Tensor) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", *attributes])
    for path, row in zip(images, probabilities.tolist()):
        writer.writerow([str(path), *(f"{p:.4f}" for p in row)])


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    p.add_argument("--checkpoint", type=Path, required=True, help="a .pth of this project")
    p.add_argument("--out", type=Path, help="CSV file to write (a new file; default: stdout)")
    p.add_argument("--batch_size", type=bounded_int(1), default=64)
    p.add_argument("--workers", type=WORKERS, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes (default: up to 4)")
    p.add_argument("--device", help="cuda, cpu... (default: cuda if present)")
    return p


def main(args: argparse.Namespace) -> None:
    if args.out is not None and args.out.exists():
        raise KamalError(f"--out {args.out} exists; it is never overwritten: pass a new file")
    if args.out is not None:
        check_output_path(args.out, "--out")
    device = check_device(args.device or default_device())
    images = find_images(args.inputs)
    attributes, probabilities = predict_images(args.checkpoint, images, device, args.batch_size,
                                               args.workers)
    if args.out is None:
        write_csv(sys.stdout, images, attributes, probabilities)
        return
    text = io.StringIO()
    write_csv(text, images, attributes, probabilities)
    try:  # fails, instead of replacing, if --out appeared meanwhile
        atomic_write_text(args.out, text.getvalue(), exclusive=True)
    except FileExistsError:
        raise KamalError(f"--out {args.out} exists; it is never overwritten: pass a new file") from None
    print(f"{len(images)} images, {len(attributes)} attributes: written to {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    run(lambda: main(get_args_parser().parse_args()))
