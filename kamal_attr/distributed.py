"""Several processes through torchrun: one per GPU (NCCL), or on CPUs (gloo).

    torchrun --nproc_per_node 8 train.py --target_attribute hair

Training a net: every process holds the net (``DistributedDataParallel`` averages the
gradients), reads ``batch_size / W`` images of each global batch (the same images one
process would see in that step) and the main process (rank 0) alone writes checkpoints,
routing lists, TensorBoard runs and the log. Routing is computed once, by rank 0, and
broadcast. ``train_sourcenet.py --all`` instead gives each process whole source nets
(:func:`my_share`): teachers are independent, so W of them train at once with no
communication. Without torchrun every function here is a no-op for one process.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from . import KamalError

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every process of the group (no-op for one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


class RaisedByMainProcess(KamalError):
    """In the other processes: the main process stopped at an error, which it reports.
    ``reported``: it prints one line, then waits for them at a barrier (a
    :class:`KamalError`; for any other error its traceback is all there is)."""

    def __init__(self, message: str, reported: bool) -> None:
        super().__init__(message)
        self.reported = reported


def main_process_first(step: Callable[[], T]) -> T | None:
    """``step()`` in the main process while the others wait; its result there, None in the
    others. An error it raises reaches every process (the others raise
    :class:`RaisedByMainProcess`, which the scripts do not print again) instead of leaving
    them waiting at the next barrier until the connection drops, with a traceback each. A
    :class:`KamalError` raised in the main process is marked ``shared``: after printing it,
    the main process meets the others at a barrier, so that none ends before it has said
    why (:func:`kamal_attr.cli.run`)."""
    error: Exception | None = None
    result = None
    if is_main_process():
        try:
            result = step()
        except Exception as e:  # re-raised below, once the others know
            error = e
    if rank_and_world()[1] > 1:
        outcome = [None if error is None else
                   (f"{type(error).__name__}: {error}", isinstance(error, KamalError))]
        dist.broadcast_object_list(outcome, src=0)
        if error is None and outcome[0] is not None:
            raise RaisedByMainProcess(*outcome[0])
        if isinstance(error, KamalError):
            error.shared = True
    if error is not None:
        raise error
    return result


def torchrun_rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` that torchrun gave this process (``(0, 1)`` without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str, batch_size: int, independent: bool = False) -> str:
    """Join torchrun's process group when started by it; returns the device this process
    uses (``cuda:LOCAL_RANK`` for a CUDA run, ``cpu`` stays ``cpu``). ``independent``:
    each process trains whole nets of its own (:func:`my_share`); it joins a gloo group
    only for the set-up (one process makes the demo data), then :func:`leave_group`."""
    world = torchrun_rank_and_world()[1]
    if world == 1 or dist.is_initialized():
        return device
    if batch_size % world and not independent:
        raise KamalError(f"--batch_size {batch_size} must be a multiple of the {world} "
                         "torchrun processes (each takes an equal share of a batch)")
    if torch.device(device).type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise KamalError(f"torchrun started {world} processes on this node but it has "
                             f"{torch.cuda.device_count()} CUDA devices")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # Rank 0 alone computes the routing (the whole training split through every source net)
    # while the others wait in a broadcast: longer than NCCL's 10-minute default on JPEGs.
    dist.init_process_group("nccl" if device.startswith("cuda") and not independent else "gloo",
                            timeout=timedelta(hours=2))
    return device


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when there are several processes; a
    method's ``forward`` is its ``forward_train``. ``find_unused_parameters`` where the
    method says a step may leave parameters without gradient (``idle_parameters``: stage 1,
    where a batch may route no image to some source net, whose bridges then get none);
    elsewhere DDP would walk the graph after every forward for nothing. Sets the module's
    ``across_processes``: a method may then exchange figures with the other processes in
    its steps (stage 1: each source net's images), which only DDP's steps run on all of
    them alike. No
    ``device_ids``: the module is on its device already, and DDP would otherwise copy the
    batch's CPU-side index to the GPU (and each step would wait to read it back)."""
    if rank_and_world()[1] == 1:
        return module
    module.across_processes = True  # its loss terms are averaged with the other processes'
    return nn.parallel.DistributedDataParallel(
        module, device_ids=None, find_unused_parameters=getattr(module, "idle_parameters", True))


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true in any process (all processes must call it)."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_processes(local: torch.Tensor) -> torch.Tensor:
    """The mean of ``local`` over the processes (all must call it; ``local`` itself in a
    single process). Stage 1 weighs each process's per-source-net mean by its share of
    that source net's images, so that the gradients DDP averages are those of the mean
    over all processes' images, as one process would compute it."""
    world = rank_and_world()[1]
    if world == 1:
        return local
    total = local.clone()
    dist.all_reduce(total)
    return total / world


def leave_group() -> None:
    """Leave torchrun's process group (after the set-up that :func:`init_distributed`
    joined it for, when each process goes on with work of its own)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's ``tensor`` on every process (CPU in, CPU out)."""
    if rank_and_world()[1] == 1:
        return tensor
    moved = tensor.to(device).contiguous()
    dist.broadcast(moved, src=0)
    return moved.cpu()


def my_share(items: Sequence[T]) -> list[T]:
    """This torchrun process's items of ``items`` (round robin), for work that needs no
    communication, such as independent source nets."""
    rank, world = torchrun_rank_and_world()
    return list(items[rank::world])
