"""Selective-learning pieces of the paper as pure functions and small modules.

- :func:`entropy_impurity` - H(x) = -sum_k p_k log p_k of a teacher's softmax (the paper's
  ambiguity score; 0 <= H <= ln 2 for a 2-way head);
- :func:`route_by_entropy` - each image learns from the source net with the lowest H;
- :class:`TransferBridge` - one 1x1 conv (with bias) per feature tap;
- :func:`unit_norm_penalty` - mean_j (||w_j||^2 - 1)^2 over a bridge's output filters, the
  anti-collapse term on the source-side bridges;
- :func:`per_sample_mse` - MSE averaged over all but the batch dimension, so losses can
  be weighted per image by the routing.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def entropy_impurity(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dimension.

    ``H = -sum_k p_k log p_k``, computed from ``log_softmax`` so that a saturated softmax
    gives 0, not NaN.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def route_by_entropy(entropies: torch.Tensor) -> torch.Tensor:
    """Index of the least-ambiguous source net per image.

    ``entropies`` has shape ``(num_images, num_sources)``; returns ``argmin`` over sources,
    ties broken towards the lowest index (``torch.argmin`` returns the first minimum).
    """
    return torch.argmin(entropies, dim=1)


def per_sample_mse(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((input - target)^2)`` over all dimensions but the first: shape ``(batch,)``."""
    return (input - target).pow(2).mean(dim=tuple(range(1, input.dim())))


class TransferBridge(nn.Module):
    """One trainable 1x1 convolution with bias per tap, mapping ``in_channels[b]`` to
    ``out_channels[b]``; applied tap-wise to a list of feature maps."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise ValueError("in_channels and out_channels need one entry per tap")
        self.convs = nn.ModuleList(nn.Conv2d(i, o, kernel_size=1, bias=True)
                                   for i, o in zip(in_channels, out_channels))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs ``(B, C_out, H, W)`` of each tap ``(B, C_in, H, W)``, channels-last.

        A 1x1 convolution is a matrix product over channels: on channels-last features the
        ``(B, H, W, C)`` view is free and one GEMM computes it, faster than a convolution
        kernel when channels are few (``python -m kamal_attr.benchmark``)."""
        return [F.linear(f.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)
                for conv, f in zip(self.convs, features)]


def unit_norm_penalty(bridge: TransferBridge) -> torch.Tensor:
    """``sum_b mean_j (||w_bj||^2 - 1)^2`` over taps b and output filters j (biases excluded).

    Keeps the source-side bridges from collapsing to zero together with the student side.
    """
    terms = [(conv.weight.flatten(1).pow(2).sum(dim=1) - 1).pow(2).mean() for conv in bridge.convs]
    return torch.stack(terms).sum()
