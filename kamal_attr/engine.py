"""The one training loop shared by source, component and target training.

Shaped like torchvision's ``references/classification``: :func:`train_one_epoch` starts
with ``method.train()``, :func:`evaluate_accuracy` runs under ``torch.inference_mode`` in eval
mode, and :func:`fit` steps the scheduler once per **epoch** (the port stepped per
iteration), evaluates on the val split and hands each epoch to a checkpoint callback.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import KamalError
from .distributed import any_rank, is_main_process, rank_and_world, wrap
from .methods import Method

log = logging.getLogger(__name__)

#: Layout of conv weights and images: channels-last (NHWC) convolutions run faster in
#: oneDNN (CPU) and cuDNN (GPU); ``python -m kamal_attr.benchmark`` measures the gain.
MEMORY_FORMAT = torch.channels_last


def place(module: nn.Module, device: torch.device) -> nn.Module:
    """Move ``module`` to ``device`` with its conv weights in :data:`MEMORY_FORMAT`."""
    return module.to(device, memory_format=MEMORY_FORMAT)


def place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch ``(B, 3, H, W)`` to ``device`` in :data:`MEMORY_FORMAT` (a no-op for
    the batches of :class:`kamal_attr.runtime.DeviceBatches`, which are there already)."""
    return images.to(device, memory_format=MEMORY_FORMAT, non_blocking=True)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``bf16`` (convolutions and matrix products in bf16,
    losses and reductions in float32: no loss scaling needed); else float32."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def show_progress() -> bool | None:
    """tqdm's ``disable``: hidden off a terminal (None) and in all but the main process."""
    return None if is_main_process() else True


@dataclass
class OptimConfig:
    """Optimiser and per-epoch schedule (METHOD.md: step x0.5 at 5..25, or cosine for the demo)."""

    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"
    milestones: Sequence[int] = (5, 10, 15, 20, 25)
    gamma: float = 0.5


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or Adam, ``fused``: one kernel updates all parameters (the per-tensor loop costs
    more than the update itself for the many small bridge tensors; CPU and CUDA)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    raise KamalError(f"--optimizer must be sgd or adam, got {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    raise KamalError(f"--schedule must be step or cosine, got {cfg.schedule!r}")


def train_one_epoch(method: Method, loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, desc: str = "train",
                    log_every: int = 20, bf16: bool = False,
                    step_module: nn.Module | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of every loss part (this process's),
    ``loss`` and ``img/s`` (of all processes together).

    Nothing in a step waits for the device: the batch's index stays on the CPU (methods
    look up per-image data there), losses are summed on the device and read once per
    ``log_every`` steps (progress bar) and at the end of the epoch. A non-finite loss
    stops training with the first step it appeared in, before any checkpoint is written.
    ``step_module``: what runs the step, ``method`` itself or its
    ``DistributedDataParallel`` wrapper.
    """
    method.train()
    step_module = step_module or method
    sums: dict[str, torch.Tensor] = {}
    step_losses: list[torch.Tensor] = []
    seen, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"{desc} epoch {epoch}", leave=False, disable=show_progress())
    for step, (images, labels, index) in enumerate(bar):
        images = place_images(images, device)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, bf16):
            parts = step_module(images, labels, index)
        loss = torch.stack(list(parts.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = images.shape[0]
        seen += n
        for k, v in [("loss", loss), *parts.items()]:
            sums[k] = sums.get(k, 0.0) + v.detach().float() * n
        step_losses.append(loss.detach())
        if step % log_every == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if seen == 0:
        raise KamalError(f"{desc}: no training batch (fewer images than --batch_size?)")
    finite = torch.isfinite(torch.stack(step_losses))
    if any_rank(not finite.all(), device):  # every process stops, none saves this epoch
        if finite.all():
            raise KamalError(f"{desc}: loss is not finite in another process at epoch {epoch} "
                             "(this epoch was not saved); lower --lr and add --overwrite")
        step = int((~finite).nonzero()[0])
        raise KamalError(f"{desc}: loss is {step_losses[step].item()} at epoch {epoch} step "
                         f"{step} (this epoch was not saved); lower --lr and add --overwrite")
    stats = {k: v.item() / seen for k, v in sums.items()}
    stats["img/s"] = seen * rank_and_world()[1] / (time.perf_counter() - start)
    return stats


def predict_many(models: Sequence[nn.Module], loader: Iterable, device: torch.device,
                 desc: str = "predict", bf16: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits ``(N, heads, 2)`` of each model (moved to ``device``, in eval mode) over one
    pass of ``loader``, and the labels, on the CPU: every batch is read (decoded) once and
    run through all models."""
    models = [place(m, device).eval() for m in models]  # outside inference mode: params stay normal
    logits: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    with torch.inference_mode(), autocast(device, bf16):
        for images, y, _ in tqdm(loader, desc=desc, leave=False, disable=show_progress()):
            images = place_images(images, device)
            for out, model in zip(logits, models):
                out.append(model(images).float().cpu())
            labels.append(y.cpu())
    return [torch.cat(out) for out in logits], torch.cat(labels)


def predict(model: nn.Module, loader: Iterable, device: torch.device,
            desc: str = "predict", bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, heads, 2)`` of one model over ``loader`` and the labels, on the CPU."""
    (logits,), labels = predict_many([model], loader, device, desc, bf16)
    return logits, labels


def accuracy_per_head(logits: torch.Tensor, labels: torch.Tensor,
                      attributes: Sequence[str]) -> dict[str, float]:
    """Per attribute: share of images whose argmax over the 2 logits equals the label."""
    correct = (logits.argmax(-1) == labels).float().mean(0)
    return {a: correct[k].item() for k, a in enumerate(attributes)}


def evaluate_accuracy(model: nn.Module, loader: Iterable, device: torch.device,
                      label_columns: Sequence[int] | None = None,
                      bf16: bool = False) -> dict[str, float]:
    """Per-attribute accuracy of ``model``'s heads; ``label_columns`` picks the loader's
    label column for each head (default: the same order)."""
    logits, labels = predict(model, loader, device, desc="val", bf16=bf16)
    if label_columns is not None:
        labels = labels[:, list(label_columns)]
    return accuracy_per_head(logits, labels, model.attributes)


def fit(method: Method, train_loader: Iterable, val_loader: Iterable,
        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
        epochs: int, device: torch.device, writer: SummaryWriter | None,
        on_epoch_end: Callable[[int, dict[str, float], dict[str, float]], None],
        start_epoch: int = 1,
        name: str = "train", val_columns: Sequence[int] | None = None,
        bf16: bool = False) -> dict[str, float]:
    """Train ``method`` for epochs ``start_epoch..epochs``; returns the last val accuracies.

    ``train_loader.sampler`` must have ``set_epoch`` (:class:`kamal_attr.runtime.EpochShuffle`):
    each epoch's data order and augmentation depend on the seed and the epoch only, so a
    run resumed at ``start_epoch`` continues exactly as an uninterrupted one.

    Per epoch: train, step the scheduler; then in the main process only, evaluate the
    student on ``val_loader``, compute the method's diagnostics on the first val batch,
    log to TensorBoard (``loss/<part>``, ``acc/val/<attribute>``, ``lr``, ``img_per_s``,
    the diagnostics; ``writer`` is None elsewhere) and to the plain log, and call
    ``on_epoch_end(epoch, val_accuracy, figures)`` (which saves the checkpoint; ``figures``:
    the epoch's mean losses, ``lr``, ``img/s`` and the diagnostics).
    """
    accuracy: dict[str, float] = {}
    step_module = wrap(method, device)  # DistributedDataParallel under torchrun
    probe = None  # a fixed batch for the diagnostics
    for epoch in range(start_epoch, epochs + 1):
        train_loader.sampler.set_epoch(epoch)  # order and augmentation: a function of (seed, epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(method, train_loader, optimizer, device, epoch, desc=name,
                                bf16=bf16, step_module=step_module)
        scheduler.step()
        if not is_main_process():
            continue
        accuracy = evaluate_accuracy(method.student, val_loader, device, val_columns, bf16)
        if probe is None:
            probe = place_images(next(iter(val_loader))[0], device)
        method.eval()
        diagnostics = method.diagnostics(probe)
        for k, v in stats.items():
            writer.add_scalar("img_per_s" if k == "img/s" else f"loss/{k}", v, epoch)
        for k, v in diagnostics.items():
            writer.add_scalar(k, v, epoch)
        for a, v in accuracy.items():
            writer.add_scalar(f"acc/val/{a}", v, epoch)
        writer.add_scalar("lr", lr, epoch)
        mean_acc = sum(accuracy.values()) / len(accuracy)
        writer.add_scalar("acc/val/mean", mean_acc, epoch)
        writer.flush()
        log.info("%s epoch %d/%d: loss %.4f, val acc %s (mean %.4f), lr %.2e, %.0f img/s",
                 name, epoch, epochs, stats["loss"],
                 " ".join(f"{a} {v:.4f}" for a, v in accuracy.items()), mean_acc, lr,
                 stats["img/s"])
        on_epoch_end(epoch, accuracy, {**stats, "lr": lr, **diagnostics})
    return accuracy
