"""Selective learning's offline step: score every training image by each source net's
entropy impurity, choose who teaches it, and write the port's routing lists."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .celeba import CelebA
from .checkpoint import atomic_write_text
from .config import RunConfig
from .distributed import broadcast, is_main_process
from .engine import predict_many
from .losses import entropy_impurity, route_by_entropy
from .models import AttributeResNet
from .pool import routing_list_name
from .runtime import eval_loader


def routing_weights(entropies: torch.Tensor, selection: str, seed: int) -> torch.Tensor:
    """One weight per (image, source net) from the entropies ``(N, S)``: one-hot rows at the
    min-entropy source net (``entropy``, the paper) or a random one fixed by ``seed``
    (``random``), or ``1/S`` everywhere (``average``)."""
    n, s = entropies.shape
    if selection == "average":
        return torch.full((n, s), 1.0 / s)
    if selection == "random":
        choice = torch.randint(0, s, (n,), generator=torch.Generator().manual_seed(seed))
    else:
        choice = route_by_entropy(entropies)
    return torch.nn.functional.one_hot(choice, s).float()


def compute_routing(teachers: Sequence[AttributeResNet], component: str, data: CelebA,
                    cfg: RunConfig, inputs: Sequence[nn.Module] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy impurity of every teacher on every image of ``data`` and the routing weights
    for ``cfg.selection``: ``(entropies (N, S), weights (N, S))``, on the CPU.

    Always scored on the un-augmented (eval) view of ``data``, whatever view it is given, so
    routing is deterministic; all teachers see each batch in one pass over the split.
    Under torchrun the main process scores and the others receive its result. ``inputs``
    feed each teacher its own input size and normalisation (identity by default).
    """
    device = torch.device(cfg.device)
    entropies = torch.zeros(len(data), len(teachers))
    if is_main_process():
        # float32 even on CUDA: the choice compares entropies, which must not depend on precision
        fed = teachers if inputs is None else [nn.Sequential(i, t) for i, t in zip(inputs, teachers)]
        logits, _ = predict_many(fed, eval_loader(cfg, data), device, desc="routing")
        entropies = torch.stack([entropy_impurity(z[:, t.attributes.index(component)])
                                 for z, t in zip(logits, teachers)], dim=1)
    entropies = broadcast(entropies, device)
    return entropies, routing_weights(entropies, cfg.selection, cfg.seed)


def write_routing(folder: Path, names: Sequence[str], files: Sequence[Path],
                  weights: torch.Tensor) -> list[Path]:
    """One list of image file names per source net (the seed's ``--sourcedata_txtroot``,
    named by :func:`~kamal_attr.pool.routing_list_name`), rewritten atomically on every
    run, never appended to."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(names):
        path = folder / routing_list_name(name)
        chosen = [files[n].name for n in torch.nonzero(weights[:, i] > 0).squeeze(1).tolist()]
        atomic_write_text(path, "".join(name + "\n" for name in chosen))
        written.append(path)
    return written
