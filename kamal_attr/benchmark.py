"""Training-step speed of the three stages in both memory layouts, measured in one run.

    python -m kamal_attr.benchmark                # demo sizes: 64 px, width 16, target 24
    python -m kamal_attr.benchmark --image_size 224 --width 64 --target_width 90 --device cuda

Each stage's ``forward_train`` + backward + Adam step runs on random images (batch 64) with
the hair group's heads, first in contiguous (NCHW) then in :data:`engine.MEMORY_FORMAT`;
it prints images/s and the ratio. Data loading is not included.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from .attributes import GROUPS, source_nets_of
from .config import default_device
from .engine import MEMORY_FORMAT
from .methods import Method, SelectiveAmalgamation, SourceTraining, TargetAmalgamation
from .models import AttributeResNet


def images_per_second(method: Method, memory_format: torch.memory_format, image_size: int,
                      batch: int, steps: int, device: torch.device) -> float:
    """Mean throughput of ``steps`` training steps after 3 warm-up steps."""
    method.to(device, memory_format=memory_format).train()
    params = [p for g in method.parameter_groups(1e-3) for p in g["params"]]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.zeros(batch, len(method.student.attributes), dtype=torch.long, device=device)
    index = torch.arange(batch, device=device)
    for step in range(steps + 3):
        if step == 3:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        loss = sum(method.forward_train(images, labels, index).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def stages(width: int, target_width: int, batch: int) -> dict[str, Callable[[], Method]]:
    """Fresh methods (random weights) shaped like the hair group's nets."""
    brown = source_nets_of("hair", "Brown_Hair")
    routing = torch.nn.functional.one_hot(torch.arange(batch) % len(brown), len(brown))
    return {
        "source net (Brown_Hair, source 6)": lambda: SourceTraining(
            AttributeResNet(brown[1].attributes, width)),
        "component (Brown_Hair, 3 source nets)": lambda: SelectiveAmalgamation(
            AttributeResNet(["Brown_Hair"], width),
            [AttributeResNet(s.attributes, width) for s in brown], "Brown_Hair", routing),
        "target (hair, 4 components)": lambda: TargetAmalgamation(
            AttributeResNet(GROUPS["hair"], target_width),
            [AttributeResNet([a], width) for a in GROUPS["hair"]]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--target_width", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default=default_device())
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.image_size} px, width {args.width}/{args.target_width}, batch {args.batch_size}")
    print(f"{'stage':40s} {'NCHW img/s':>11s} {'NHWC img/s':>11s} {'ratio':>6s}")
    for name, build in stages(args.width, args.target_width, args.batch_size).items():
        speed = {}
        for fmt in (torch.contiguous_format, MEMORY_FORMAT):
            torch.manual_seed(0)
            speed[fmt] = images_per_second(build(), fmt, args.image_size, args.batch_size,
                                           args.steps, device)
        print(f"{name:40s} {speed[torch.contiguous_format]:11.0f} {speed[MEMORY_FORMAT]:11.0f} "
              f"{speed[MEMORY_FORMAT] / speed[torch.contiguous_format]:6.2f}")


if __name__ == "__main__":
    main()
