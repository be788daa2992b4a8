"""Selective-learning pieces of the paper as pure functions and small modules.

- :func:`entropy_impurity` - H(x) = -sum_k p_k log p_k of a teacher's softmax (the paper's
  ambiguity score; 0 <= H <= ln 2 for a 2-way head);
- :func:`route_by_entropy` - each image learns from the source net with the lowest H;
- :class:`TransferBridge` - one 1x1 conv (with bias) per feature tap;
- :func:`unit_norm_penalty` - mean_j (||w_j||^2 - 1)^2 over a bridge's output filters, the
  anti-collapse term on the source-side bridges;
- :func:`per_sample_mse` - MSE averaged over all but the batch dimension, so losses can
  be weighted per image by the routing;
- :func:`bridged_mse` - the feature loss of a tap, ``MSE(C f + c, S g + s)`` per source net
  over the images routed to it, in fewer passes than autograd takes for the same arithmetic.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


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
        return [apply_bridge(conv, f) for conv, f in zip(self.convs, features)]


def apply_bridge(conv: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    """One tap's 1x1 ``conv`` as :class:`TransferBridge` applies it: one GEMM over the
    ``(B, H, W, C)`` view of channels-last ``features``."""
    return F.linear(features.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


def unit_norm_penalty(bridge: TransferBridge) -> torch.Tensor:
    """``sum_b mean_j (||w_bj||^2 - 1)^2`` over taps b and output filters j (biases excluded).

    Keeps the source-side bridges from collapsing to zero together with the student side.
    """
    terms = [(conv.weight.flatten(1).pow(2).sum(dim=1) - 1).pow(2).mean() for conv in bridge.convs]
    return torch.stack(terms).sum()


#: One term of :func:`bridged_mse`: the student-side bridge conv of the tap, the teacher's
#: features at the tap (None when no image of the batch is routed to it) and the
#: teacher-side bridge conv (None where the features are the target as they are: stage 2).
BridgeTerm = tuple[nn.Conv2d, torch.Tensor | None, nn.Conv2d | None]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B*H*W, C)``: a view of channels-last features (else a copy)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _BridgedMSE(torch.autograd.Function):
    """The arithmetic of ``F.mse_loss(apply_bridge(C, f_i), apply_bridge(S, g_i))`` per block
    of rows, with the gradients autograd derives for it (``addmm``, then ``mse_loss``)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, counts: list[int], *flat: torch.Tensor | None):
        f = _rows(features)
        pixels = features.shape[2] * features.shape[3]
        losses, saved, blocks, start = [], [], [], 0
        # five slots per term: student-side weight and bias, target, target-side weight and bias
        for n, (weight, bias, target, t_weight, t_bias) in zip(
                counts, (flat[k:k + 5] for k in range(0, len(flat), 5))):
            if n == 0:
                losses.append(f.new_zeros(()))
                blocks.append(None)
                continue
            rows = slice(start, start + n * pixels)
            start = rows.stop
            target = _rows(target)
            residual = torch.addmm(bias, f[rows], weight.t())
            bridged = t_weight is not None
            residual.sub_(torch.addmm(t_bias, target, t_weight.t()) if bridged else target)
            flat_residual = residual.view(-1)
            losses.append(torch.dot(flat_residual, flat_residual) / residual.numel())
            blocks.append((rows, n, bridged))
            saved += [residual, weight, target if bridged else None]
        ctx.blocks, ctx.shape, ctx.pixels = blocks, features.shape, pixels
        ctx.save_for_backward(f, *saved)
        return torch.stack(losses)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        f, *saved = ctx.saved_tensors
        per_block = iter(zip(saved[0::3], saved[1::3], saved[2::3]))
        # The gradient is a tensor of its own, channels-last, not a view of a (B*H*W, C) one:
        # autograd can then add the tap's other gradient into it in place (it copies into a
        # new tensor when the gradients it sums are views), one pass over the tap fewer.
        grad_features = (torch.empty(ctx.shape, dtype=f.dtype, device=f.device,
                                     memory_format=torch.channels_last)
                         if ctx.needs_input_grad[0] else None)
        grad_f = (None if grad_features is None  # a view, whose rows the blocks write
                  else grad_features.permute(0, 2, 3, 1).view(-1, ctx.shape[1]))
        grads: list[torch.Tensor | None] = []
        for i, block in enumerate(ctx.blocks):
            if block is None:
                grads += [None] * 5
                continue
            (rows, images, bridged), (residual, weight, target) = block, next(per_block)
            # mse_loss's backward, 2/N (a - b) grad, on the residual kept from the forward
            d = residual.mul_(grad[i] * (2.0 / residual.numel()))
            if images == 1 and ctx.pixels > 1:
                # autograd's gradient here is a view of mse_loss's NCHW-contiguous gradient:
                # for one image a column-major one, whose sums run in another order
                d = d.t().contiguous().t()
            if grad_f is not None:
                torch.mm(d, weight, out=grad_f[rows])
            grad_weight, grad_bias = torch.mm(d.t(), f[rows]), d.sum(0)
            grads += [grad_weight, grad_bias, None] + (
                [torch.mm(d.t(), target).neg_(), grad_bias.neg()] if bridged else [None, None])
        return (grad_features, None, *grads)


def bridged_mse(features: torch.Tensor, counts: Sequence[int],
                terms: Sequence[BridgeTerm]) -> torch.Tensor:
    """Per term i, ``MSE(C_i f_i + c_i, S_i g_i + s_i)`` (or ``MSE(C_i f_i + c_i, g_i)``
    without a teacher-side conv), where f_i are the next ``counts[i]`` images of the
    student's tap ``features`` ``(B, C, H, W)``, g_i the teacher's features at the same tap
    (no gradient) and C_i, S_i 1x1 convolutions. Returns the ``len(terms)`` losses; an
    empty block's loss is 0 and its convs stay out of the graph (no gradient, as before).

    The same kernels in the same order as ``F.mse_loss`` of :func:`apply_bridge`'s outputs
    chunk by chunk, so on channels-last float32 features, with the loss summed with weight
    1 as training does, the gradients are bitwise autograd's (``tests/test_losses.py``,
    ``tests/test_methods.py``); the logged loss may differ in the last bits. It takes
    fewer passes over the step's largest tensors: the residual ``a - b`` is formed once
    and becomes the backward's ``2 (a - b) / N`` in place (``mse_loss``'s backward reads
    ``a`` and ``b`` again), and each block's gradient is written into its rows of one
    tensor (a split's backward concatenates), into which autograd adds the tap's gradient
    from the next layer in place. Under autocast, which casts inside each op
    (bridges in its dtype, the MSE in float32), it is that plain formulation.
    """
    if sum(counts) != features.shape[0] or len(counts) != len(terms):
        raise ValueError("bridged_mse needs one count per term, summing to the batch size")
    for n, (conv, target, t_conv) in zip(counts, terms):
        channels = conv.out_channels if t_conv is None else t_conv.in_channels
        if n and (target is None or target.requires_grad
                  or target.shape != (n, channels, *features.shape[2:])):
            raise ValueError(f"bridged_mse: a block of {n} images needs a target of shape "
                             f"({n}, {channels}, {features.shape[2]}, {features.shape[3]}) "
                             "without gradient")
    if torch.is_autocast_enabled(features.device.type):
        return torch.stack([
            features.new_zeros((), dtype=torch.float32) if n == 0 else F.mse_loss(
                apply_bridge(conv, f), target if t_conv is None else apply_bridge(t_conv, target))
            for n, f, (conv, target, t_conv) in zip(counts, features.split(list(counts)), terms)])
    flat: list[torch.Tensor | None] = []
    for n, (conv, target, t_conv) in zip(counts, terms):
        used = n > 0  # an idle term's convs stay out of the graph, as when it was skipped
        # (DistributedDataParallel's find_unused_parameters then counts them unused)
        flat += [conv.weight.flatten(1), conv.bias, target] if used else [None] * 3
        flat += ([t_conv.weight.flatten(1), t_conv.bias] if used and t_conv is not None
                 else [None, None])
    return _BridgedMSE.apply(features, list(counts), *flat)
