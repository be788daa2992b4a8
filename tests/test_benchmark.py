import copy

import pytest
import torch

from kamal_attr.benchmark import (EPOCHS, TRAIN_IMAGES, VAL_IMAGES, build_step, compile_rows,
                                  cost_split, protocol_hours)
from kamal_attr.methods import SourceTraining
from kamal_attr.models import AttributeResNet


def test_protocol_extrapolation_counts_every_net_epoch_and_image():
    rates = {"source net": 1000.0, "stage 1": 500.0, "stage 2": 250.0}
    total, parts = protocol_hours(rates, loader=10_000.0)
    per_net = EPOCHS * (TRAIN_IMAGES + VAL_IMAGES / 3) / 3600
    assert parts == pytest.approx({"source nets": 22 * per_net / 1000,
                                   "component nets": 10 * per_net / 500,
                                   "target nets": 3 * per_net / 250})
    assert total == pytest.approx(sum(parts.values()))
    slow_loader, _ = protocol_hours(rates, loader=100.0)  # data loading included: the slower wins
    assert slow_loader == pytest.approx(35 * per_net / 100)


def test_cost_split_in_plain_steps():
    """A stage step at half the plain step's rate costs 2 plain steps: 1 for the student,
    then the teachers' forward (what the logits-only step adds) and the feature loss (the
    rest); target 4's 0.65 allows 1/0.65 - 1 = 0.54 beyond the student's own step."""
    steps = {"stage 1 ratio": 0.5, "stage 1, logits only ratio": 0.8, "stage 1 teachers": 3}
    assert cost_split(steps, "stage 1", 0.65) == (
        "stage 1 step = 1 + 0.25 (3 source nets' forward, logit loss) + 0.75 (feature loss) "
        "plain steps; target 4 allows 1 + 0.54")


def test_compile_rows_judge_each_stage_against_its_eager_step():
    assert compile_rows({}) == [("3 torch.compile step / eager step", "-", ">= 1.05",
                                 "not measured: --compile (compiling takes minutes)")]
    steps = {"source net compile speed-up": 1.2, "stage 1 compile speed-up": 1.01,
             "stage 2 compile speed-up": 0.9}
    assert [(r[1], r[3]) for r in compile_rows(steps)] == [
        ("1.200", "helps"), ("1.010", "no gain"), ("0.900", "slower")]


def test_a_compiled_step_trains_the_method_as_the_eager_step_does():
    """``--compile`` times the same step: from the same start and batch, the compiled
    method's gradients are the eager method's (up to the rounding of fused kernels: within
    0.1 % in norm, about 1e-4 measured), and the optimiser moves every parameter."""
    torch.manual_seed(0)
    eager = SourceTraining(AttributeResNet(["Bangs", "Smiling"], 4))
    compiled = copy.deepcopy(eager)
    start = [p.detach().clone() for p in eager.parameters()]
    traced = []  # whether dynamo was tracing when each student ran
    for method, flag in ((eager, False), (compiled, True)):
        method.student.register_forward_pre_hook(
            lambda *_: traced.append(torch.compiler.is_compiling()))
        torch.manual_seed(1)  # the same random batch
        build_step(method, torch.device("cpu"), 32, 4, bf16=False, compiled=flag)()
    assert traced == [False, True]
    for a, b, before in zip(eager.parameters(), compiled.parameters(), start):
        assert (b.grad - a.grad).norm() <= 1e-3 * a.grad.norm()
        assert not torch.equal(b, before)


def test_too_few_images_for_the_batch_size_is_refused_before_any_timing():
    from kamal_attr import KamalError
    from kamal_attr.benchmark import main
    with pytest.raises(KamalError, match="--images 600 makes 360 training images, fewer than 3 "
                                         "batches of --batch_size 400: pass --images 2000 or more"):
        main(["--batch_size", "400", "--images", "600"])
