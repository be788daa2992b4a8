import math

import pytest
import torch
import torch.nn.functional as F

from kamal_attr.losses import (TransferBridge, _BridgedMSE, apply_bridge, bridged_mse,
                               entropy_impurity, per_sample_mse, route_by_entropy,
                               unit_norm_penalty)


def test_entropy_impurity_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0], [100.0, -100.0]])
    h = entropy_impurity(logits)
    # p = (1/2, 1/2) -> ln 2; p = (4/5, 1/5) -> -(0.8 ln 0.8 + 0.2 ln 0.2); saturated -> 0
    expected = [math.log(2), -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), 0.0]
    assert h.tolist() == pytest.approx(expected, abs=1e-6)
    assert not torch.isnan(h).any()


def test_route_by_entropy_picks_argmin_ties_lowest():
    entropies = torch.tensor([[0.3, 0.1, 0.2], [0.2, 0.2, 0.5], [0.4, 0.4, 0.4], [0.6, 0.5, 0.1]])
    assert route_by_entropy(entropies).tolist() == [1, 0, 0, 2]


def test_bridge_shapes():
    bridge = TransferBridge([8, 8, 16], [4, 4, 8])
    out = bridge([torch.randn(2, 8, 5, 5), torch.randn(2, 8, 3, 3), torch.randn(2, 16, 2, 2)])
    assert [o.shape for o in out] == [(2, 4, 5, 5), (2, 4, 3, 3), (2, 8, 2, 2)]
    assert all(c.kernel_size == (1, 1) and c.bias is not None for c in bridge.convs)


def test_penalty_zero_at_unit_norm_filters_and_pulls_towards_them():
    bridge = TransferBridge([6, 4], [3, 2])
    with torch.no_grad():
        for conv in bridge.convs:
            w = torch.randn_like(conv.weight)
            conv.weight.copy_(w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
            conv.bias.fill_(5.0)  # biases are excluded
    assert unit_norm_penalty(bridge).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        bridge.convs[0].weight.mul_(2.0)  # norm 2: ||w||^2 - 1 = 3 -> penalty 9
        bridge.convs[1].weight.mul_(0.5)  # norm 1/2: (1/4 - 1)^2 = 0.5625
    penalty = unit_norm_penalty(bridge)
    assert penalty.item() == pytest.approx(9 + 0.5625, rel=1e-5)
    penalty.backward()
    # a gradient step shrinks the too-long filters and grows the too-short ones
    for conv, sign in ((bridge.convs[0], 1), (bridge.convs[1], -1)):
        radial = (conv.weight.grad * conv.weight).flatten(1).sum(1)
        assert (sign * radial > 0).all()
        assert conv.bias.grad is None


def test_per_sample_mse():
    a, b = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    b[1] *= 3
    assert per_sample_mse(a, b).tolist() == [1.0, 9.0]


@pytest.mark.parametrize("channels_last", [True, False])
def test_bridged_mse_gives_autograds_gradients_bitwise(channels_last):
    """bridged_mse is an implementation detail of the feature loss: on channels-last
    features (as training holds them) the gradients are exactly those of mse_loss over the
    bridges' outputs, chunk by chunk (the formulation it replaced), so that it changes no
    result of the demo or the report; on other layouts F.linear takes another kernel and
    only rounding differs. An empty block's convs get no gradient (the optimiser then skips
    them, as before)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    features = torch.randn(7, 5, 4, 3).contiguous(memory_format=fmt).requires_grad_()
    counts = [2, 0, 1, 4]  # an empty block and a one-image block (another gradient layout)
    student_side = [torch.nn.Conv2d(5, 3, 1) for _ in counts]
    teacher_side = [torch.nn.Conv2d(7, 3, 1) for _ in counts]
    targets = [torch.randn(n, 7, 4, 3).contiguous(memory_format=fmt) if n else None for n in counts]
    losses = bridged_mse(features, counts, list(zip(student_side, targets, teacher_side)))
    losses.sum().backward()
    fused = [features.grad] + [p.grad for c in student_side + teacher_side for p in c.parameters()]
    for conv in student_side + teacher_side:
        conv.zero_grad(set_to_none=True)
    features.grad = None
    reference = sum(F.mse_loss(apply_bridge(c, f), apply_bridge(t, g))
                    for c, t, f, g in zip(student_side, teacher_side, features.split(counts), targets)
                    if g is not None)
    reference.backward()
    expected = [features.grad] + [p.grad for c in student_side + teacher_side for p in c.parameters()]
    assert losses[1] == 0 and losses.sum().item() == pytest.approx(reference.item(), rel=1e-6)
    same = torch.equal if channels_last else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
    for got, want in zip(fused, expected):
        assert (got is None) == (want is None)
        assert got is None or same(got, want)
    assert student_side[1].weight.grad is None and teacher_side[1].bias.grad is None
    leaves, pending = set(), [losses.grad_fn]
    while pending:  # the idle block's convs are not even in the graph (as when it was skipped)
        node = pending.pop()
        leaves |= {id(node.variable)} if hasattr(node, "variable") else set()
        pending += [n for n, _ in node.next_functions if n is not None]
    idle = [*student_side[1].parameters(), *teacher_side[1].parameters()]
    assert leaves and not leaves & {id(p) for p in idle}


def test_bridged_mse_against_plain_targets_and_bad_input():
    """Stage 2: the component's features are the target as they are (no teacher-side conv)."""
    torch.manual_seed(1)
    features = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv, target = torch.nn.Conv2d(4, 6, 1), torch.randn(3, 6, 5, 5)
    loss = bridged_mse(features, [3], [(conv, target, None)])
    loss.sum().backward()
    fused = (features.grad, conv.weight.grad, conv.bias.grad)
    features.grad = conv.weight.grad = conv.bias.grad = None
    reference = F.mse_loss(apply_bridge(conv, features), target)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(fused, (features.grad, conv.weight.grad, conv.bias.grad)))
    with pytest.raises(ValueError, match="one count per term"):
        bridged_mse(features, [2], [(conv, target, None)])
    # other pixels, other channels, other images, none, not a fixed target
    for bad in (target[:, :, :4], target[:, :1], target[:2], None, target.requires_grad_()):
        with pytest.raises(ValueError, match="needs a target of shape"):
            bridged_mse(features, [3], [(conv, bad, None)])


def test_autograd_adds_the_next_layers_gradient_into_bridged_mses_in_place(monkeypatch):
    """The tap's gradient is a channels-last tensor of its own, not a view: where the tap
    also feeds the next layer, autograd adds that layer's gradient into it in place (it
    sums into a third full-size tensor when the first gradient is a view)."""
    returned = []  # where the tap gradient bridged_mse's backward hands to autograd lies
    backward = _BridgedMSE.backward

    def recording(ctx, grad):
        grads = backward(ctx, grad)  # (a reference kept here would stop autograd adding into it)
        channels_last = grads[0].is_contiguous(memory_format=torch.channels_last)
        returned.append((grads[0].data_ptr(), channels_last))
        return grads
    monkeypatch.setattr(_BridgedMSE, "backward", staticmethod(recording))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    tap = conv(x)
    summed = []  # the tap's gradient once both consumers' parts are in
    tap.register_hook(lambda g: summed.append(g.data_ptr()))
    bridge, target = torch.nn.Conv2d(4, 2, 1), torch.randn(2, 2, 5, 5)
    loss = (torch.nn.BatchNorm2d(4)(tap).square().sum()
            + bridged_mse(tap, [2], [(bridge, target, None)]).sum())
    loss.backward()
    assert returned == [(summed[0], True)]


def test_bridged_mse_backpropagates_once():
    """The residual becomes the gradient in place, so a second backward through the same
    graph is refused (autograd's version check), never silently wrong."""
    features = torch.randn(2, 3, 2, 2).requires_grad_()
    loss = bridged_mse(features, [2], [(torch.nn.Conv2d(3, 2, 1), torch.randn(2, 2, 2, 2), None)])
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_bridged_mse_under_autocast_is_the_plain_formulation():
    """Autocast casts inside each op (bridges in bf16 on bf16 taps, the MSE in float32):
    there bridged_mse is the plain formulation, with its losses in float32 and the taps'
    gradient in their own dtype (CPU autocast here; CUDA autocast in training)."""
    torch.manual_seed(3)
    features = torch.randn(2, 4, 3, 3).to(torch.bfloat16).requires_grad_()
    conv, target = torch.nn.Conv2d(4, 2, 1), torch.randn(2, 2, 3, 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bridged_mse(features, [2], [(conv, target, None)])
        reference = F.mse_loss(apply_bridge(conv, features), target)
    assert loss.dtype == torch.float32 and torch.equal(loss[0], reference)
    loss.sum().backward()
    assert features.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
