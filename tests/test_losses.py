import math

import pytest
import torch

from kamal_attr.losses import (TransferBridge, entropy_impurity, per_sample_mse, route_by_entropy,
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
