"""torchrun on the CPU (gloo, 2 processes): the same learning as one process, each file
written once, source nets spread over the processes."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kamal_attr.checkpoint import load_checkpoint
from kamal_attr.config import add_common_args, resolve_config
from kamal_attr.distributed import wrap
from kamal_attr.engine import OptimConfig, build_optimizer, train_one_epoch
from kamal_attr.methods import SelectiveAmalgamation, SourceTraining
from kamal_attr.models import AttributeResNet
from kamal_attr.runtime import dataset, train_loader

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--image_size", "32", "--batch_size", "8", "--workers", "0", "--device", "cpu"]


def launch(script: str, args: list[str], processes: int, fails: bool = False) -> subprocess.CompletedProcess:
    """``script`` under torchrun with ``processes`` CPU processes (which must succeed,
    unless ``fails``)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun + [str(REPO / script)] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode != 0) == fails, f"{script} with {processes} processes:\n{done.stderr[-3000:]}"
    return done


class Probe(nn.Module):
    """A student without BatchNorm, so that 2 processes must learn exactly what 1 does
    (with BatchNorm, statistics over half a batch differ)."""

    attributes = ("Smiling", "Male")

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)).view(-1, 2, 2)


def train_probe(rank: int, world: int, root: str, out: str, port: str) -> None:
    """Two epochs of the real training loop (loader, sampler, DDP wrap) on ``world`` processes."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    flags = argparse.ArgumentParser()
    add_common_args(flags)
    cfg = resolve_config(flags.parse_args(["--data_root", root, "--save_root", out] + SMALL))
    torch.manual_seed(0)
    method = SourceTraining(Probe())
    optimizer = build_optimizer(method.parameter_groups(0.1), OptimConfig("sgd", 0.1))
    loader = train_loader(cfg, dataset(cfg, "train", Probe.attributes, train=True), seed=5)
    step_module = wrap(method, torch.device("cpu"))
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(method, loader, optimizer, torch.device("cpu"), epoch,
                        step_module=step_module)
    if rank == 0:
        torch.save(method.student.state_dict(), Path(out) / f"probe{world}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def test_two_processes_learn_exactly_what_one_does(tmp_path, synthetic_root):
    """Each process takes half of every batch (together, the images one process takes) and
    DistributedDataParallel averages the gradients: the same weights come out."""
    train_probe(0, 1, str(synthetic_root), str(tmp_path), "")
    torch.multiprocessing.spawn(train_probe, nprocs=2,
                                args=(2, str(synthetic_root), str(tmp_path), "29533"))
    one, two = (torch.load(tmp_path / f"probe{w}.pt", weights_only=True) for w in (1, 2))
    torch.manual_seed(0)
    start = Probe().state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3, "nothing was learnt"
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), f"{k}: 2 processes learnt otherwise than 1"


def amalgamate_with_an_idle_source_net(rank: int, out: str, port: str) -> None:
    """Two stage-1 steps on 2 processes, source net 1 idle in rank 0's batches only."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    routing = torch.tensor([[1.0, 0.0]] * 4 + [[1.0, 0.0], [0.0, 1.0]] * 2)  # rows 0-3: rank 0
    method = SelectiveAmalgamation(AttributeResNet(["Bangs"], 16),
                                   [AttributeResNet(["Bangs"], 8) for _ in range(2)], "Bangs", routing)
    optimizer = build_optimizer(method.train().parameter_groups(0.1), OptimConfig("sgd", 0.1))
    step_module = wrap(method, torch.device("cpu"))
    for _ in range(2):
        parts = step_module(torch.randn(4, 3, 32, 32), None, torch.arange(4) + 4 * rank)
        optimizer.zero_grad(set_to_none=True)
        torch.stack(list(parts.values())).sum().backward()
        optimizer.step()
    torch.save(method.component_bridges.state_dict(), Path(out) / f"bridges{rank}.pt")
    torch.distributed.destroy_process_group()


def test_a_source_net_idle_in_one_process(tmp_path):
    """A source net with no image in one process's batch (its bridges get a gradient in the
    other process only): the steps complete and both processes hold the same bridges."""
    torch.multiprocessing.spawn(amalgamate_with_an_idle_source_net, nprocs=2,
                                args=(str(tmp_path), "29541"))
    first, second = (torch.load(tmp_path / f"bridges{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)


def stage1_gradients(rank: int, world: int, out: str, port: str) -> None:
    """One stage-1 step on 8 images, by 1 process or by 2 (4 images each), with one-hot and
    with weighted routing that give the two processes unequal shares of each source net;
    the student's BatchNorm uses its running statistics, so that images do not interact."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    one_hot = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 2 + [[1.0, 0.0]] + [[0.0, 1.0]] * 2)
    weighted = torch.tensor([[0.9, 0.1]] * 4 + [[0.2, 0.8]] * 3 + [[0.5, 0.5]])
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    mine = slice(4 * rank, 4 * rank + 4) if world > 1 else slice(0, 8)
    grads = {}
    for name, routing in (("one-hot", one_hot), ("weighted", weighted)):
        torch.manual_seed(0)
        method = SelectiveAmalgamation(AttributeResNet(["Bangs"], 16),
                                       [AttributeResNet(["Bangs"], 8) for _ in range(2)], "Bangs",
                                       routing).to(memory_format=torch.channels_last).train()
        for m in method.student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        step_module = wrap(method, torch.device("cpu"))
        parts = step_module(images[mine], None, torch.arange(8)[mine])
        torch.stack(list(parts.values())).sum().backward()
        grads[name] = {k: p.grad for k, p in method.named_parameters() if p.grad is not None}
    torch.save(grads, Path(out) / f"stage1_{world}_{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def test_stage1_on_two_processes_takes_each_source_nets_mean_over_all_images(tmp_path):
    """Each process weighs a source net's MSE over its own images by its share of that
    source net's images in the batch: the gradients DDP averages are one process's, also
    when the processes have unequal shares (3 and 1 images of a source net)."""
    stage1_gradients(0, 1, str(tmp_path), "")
    torch.multiprocessing.spawn(stage1_gradients, nprocs=2, args=(2, str(tmp_path), "29547"))
    one, two = (torch.load(tmp_path / f"stage1_{w}_0.pt", weights_only=True) for w in (1, 2))
    for routing in one:
        assert one[routing].keys() == two[routing].keys()
        for k, g in one[routing].items():
            assert torch.allclose(two[routing][k], g, rtol=1e-4, atol=1e-6), f"{routing}: {k}"


def test_one_net_on_two_processes_is_written_once(tmp_path, synthetic_root):
    args = ["--target_attribute", "Black_Hair", "--source_id", "1", "--data_root",
            str(synthetic_root), "--epochs", "2", "--width", "4", "--pretrained", "none",
            "--save_root", str(tmp_path)] + SMALL
    launch("train_sourcenet.py", args, 2)
    net = tmp_path / "snapshot/sources/hair/source1_Black_Hair"
    assert sorted(p.name for p in net.iterdir()) == ["epoch_001.pth", "epoch_002.pth", "last.pth"]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("epoch 2/2") == 1, "the log has one line per epoch (rank 0 only)"
    assert len(list((tmp_path / "run" / "sources").rglob("events.out.tfevents.*"))) == 1


def test_a_stale_net_under_torchrun_is_one_error_line_and_no_traceback(tmp_path, synthetic_root):
    """The main process finds the stale net; the other one, which waited for its verdict,
    ends quietly instead of with a traceback when the connection drops."""
    args = ["--target_attribute", "Black_Hair", "--source_id", "1", "--data_root",
            str(synthetic_root), "--epochs", "1", "--pretrained", "none", "--save_root",
            str(tmp_path)] + SMALL
    launch("train_sourcenet.py", args + ["--width", "8"], 1)
    done = launch("train_sourcenet.py", args + ["--width", "12"], 2, fails=True)
    ours = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(ours) == 1 and "was made by another recipe" in ours[0] and "width: 8 -> 12" in ours[0]
    ours_part = done.stderr.split("torch/distributed/elastic")[0]  # before torchrun's own report
    assert "Traceback" not in ours_part and "[rank1]" not in done.stderr, done.stderr[-3000:]
    assert "terminate called" not in done.stderr and "SIGABRT" not in done.stderr, done.stderr[-3000:]
    assert "exitcode: 2" in done.stderr and "exitcode: -" not in done.stderr, done.stderr[-3000:]


def test_all_source_nets_spread_over_processes_then_amalgamated_together(tmp_path, synthetic_root):
    common = ["--data_root", str(synthetic_root), "--save_root", str(tmp_path)] + SMALL
    done = launch("train_sourcenet.py", ["--all", "--group", "hair", "--epochs", "1", "--width", "4",
                                         "--pretrained", "none"] + common, 2)
    assert len(list((tmp_path / "snapshot/sources/hair").glob("*/epoch_001.pth"))) == 9
    assert done.stderr.count(": saved ") == 9, "each source net is trained by one process"
    launch("train.py", ["--target_attribute", "hair", "--sorce_saveEpoch", "1",
                        "--component_saveEpoch", "1", "--target_epoch", "1", "--width", "4",
                        "--target_width", "6"] + common, 2)
    lists = sorted((tmp_path / "data/sources/hair/entropy").glob("*.txt"))
    assert len(lists) == 9 and sum(len(p.read_text().split()) for p in lists) == 4 * 32, \
        "routing lists: written once, every training image once per attribute"
    target = load_checkpoint(tmp_path / "snapshot/target/hair/entropy/epoch_001.pth")
    assert target["kind"] == "target" and len(target["components"]) == 4
    assert len(list((tmp_path / "run/target").rglob("events.out.tfevents.*"))) == 1
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"

