"""The three training stages, each one ``nn.Module`` with ``forward_train``.

Every method owns its student (and frozen teachers and bridges) and returns its loss as a
dict of named parts; :mod:`kamal_attr.engine` sums the parts, so all stages share one loop.

- :class:`SourceTraining` - supervised: one cross-entropy per attribute head, summed.
- :class:`SelectiveAmalgamation` - stage 1: a component net learns one attribute from its
  source nets, each image through the teacher(s) its routing weight selects.
- :class:`TargetAmalgamation` - stage 2: the multi-head target net learns every attribute
  from its component net, on all images.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .losses import TransferBridge, per_sample_mse, unit_norm_penalty
from .models import TAP_LAYERS, AttributeResNet, FeatureTaps, tap_channels

#: Learning-rate factor of the bridges at each tap, relative to the net's (METHOD.md:
#: 1e-4, 1e-4, 1e-5, 1e-4, 1e-4 with a net lr of 1e-4).
BRIDGE_LR_SCALE = (1.0, 1.0, 0.1, 1.0, 1.0)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher never changes, BatchNorm statistics included."""
    return net.eval().requires_grad_(False)


class Method(nn.Module):
    """Base class: a student plus frozen ``teachers`` kept in eval mode by ``train()``."""

    def __init__(self, student: AttributeResNet, teachers: Sequence[AttributeResNet] = ()) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(freeze(t) for t in teachers)

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        self.teachers.eval()
        return self

    def parameter_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.student.parameters()), "lr": lr}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the teachers (which are files of their own): for resuming."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teachers.")}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      index: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SourceTraining(Method):
    """Supervised training of a source net: ``sum_a CE(z_a, y_a)`` over its heads."""

    def forward_train(self, images, labels, index):
        logits = self.student(images)
        return {"ce": F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="mean")
                * logits.shape[1]}


def _bridge_groups(bridges: Sequence[TransferBridge], lr: float) -> list[dict]:
    """One parameter group per tap so each tap gets its METHOD.md learning rate."""
    return [{"params": [p for br in bridges for p in br.convs[b].parameters()],
             "lr": lr * BRIDGE_LR_SCALE[b]} for b in range(len(TAP_LAYERS))]


class SelectiveAmalgamation(Method):
    """Stage 1: source nets -> one component net for ``attribute``.

    ``routing`` holds one weight per (training image, source net): one-hot rows for
    min-entropy (the paper) or random selection, uniform rows ``1/S`` for averaging. With
    per-image loss ``l_i(x) = sum_b MSE(C_ib(F_s_b), S_ib(F_i_b)) + MSE(z_s, z_i)`` the loss is

        L = sum_i (1/B) sum_x w_xi l_i(x) + sum_i sum_b mean_j (||S_ibj||^2 - 1)^2

    where C_i / S_i are the component-/source-side bridges of source net i (1x1 convs to
    half the teacher's channels). Teacher i runs only on the images with ``w_xi > 0``, so
    an image's loss reaches only the bridges of the source nets it is routed to.
    """

    def __init__(self, student: AttributeResNet, teachers: Sequence[AttributeResNet],
                 attribute: str, routing: torch.Tensor, feature_loss: bool = True) -> None:
        super().__init__(student, teachers)
        if routing.shape[1] != len(teachers):
            raise ValueError("routing needs one column per source net")
        self.register_buffer("routing", routing.float(), persistent=False)
        self.heads = [t.attributes.index(attribute) for t in teachers]
        self.feature_loss = feature_loss
        self.student_taps = FeatureTaps(student)
        self.teacher_taps = [FeatureTaps(t) for t in teachers]
        if feature_loss:
            student_c = tap_channels(student.width)
            half = [[c // 2 for c in tap_channels(t.width)] for t in teachers]
            self.source_bridges = nn.ModuleList(
                TransferBridge(tap_channels(t.width), h) for t, h in zip(teachers, half))
            self.component_bridges = nn.ModuleList(TransferBridge(student_c, h) for h in half)

    def parameter_groups(self, lr):
        groups = super().parameter_groups(lr)
        if self.feature_loss:
            groups += _bridge_groups(list(self.source_bridges) + list(self.component_bridges), lr)
        return groups

    def forward_train(self, images, labels, index):
        weights = self.routing[index]
        batch = images.shape[0]
        z_student = self.student(images)[:, 0]
        f_student = self.student_taps.features()
        losses = {"logit": images.new_zeros(())}
        if self.feature_loss:
            losses.update({f"feature/{tap}": images.new_zeros(()) for tap in TAP_LAYERS})
        for i, teacher in enumerate(self.teachers):
            selected = torch.nonzero(weights[:, i] > 0).squeeze(1)
            if selected.numel() == 0:
                continue
            w = weights[selected, i] / batch
            with torch.no_grad():
                z_teacher = teacher(images[selected])[:, self.heads[i]]
                f_teacher = self.teacher_taps[i].features()
            losses["logit"] = losses["logit"] + (w * per_sample_mse(z_student[selected], z_teacher)).sum()
            if self.feature_loss:
                source_side = self.source_bridges[i](f_teacher)
                component_side = self.component_bridges[i]([f[selected] for f in f_student])
                for tap, c, s in zip(TAP_LAYERS, component_side, source_side):
                    losses[f"feature/{tap}"] = losses[f"feature/{tap}"] + (w * per_sample_mse(c, s)).sum()
        if self.feature_loss:
            losses["penalty"] = torch.stack([unit_norm_penalty(br) for br in self.source_bridges]).sum()
        return losses


class TargetAmalgamation(Method):
    """Stage 2: component nets -> the multi-head target net, on all images.

        L = sum_j [ sum_b MSE(A_jb(F_target_b), F_j_b) + MSE(z_target_j, z_j) ]

    with ``A_jb`` a trainable 1x1 conv from the target's tap b to component j's channels.
    The target runs once per batch; each component runs once on the same images.
    """

    def __init__(self, student: AttributeResNet, components: Sequence[AttributeResNet],
                 feature_loss: bool = True) -> None:
        super().__init__(student, components)
        self.feature_loss = feature_loss
        self.student_taps = FeatureTaps(student)
        self.teacher_taps = [FeatureTaps(c) for c in components]
        if feature_loss:
            self.bridges = nn.ModuleList(
                TransferBridge(tap_channels(student.width), tap_channels(c.width)) for c in components)

    def parameter_groups(self, lr):
        groups = super().parameter_groups(lr)
        if self.feature_loss:
            groups += _bridge_groups(self.bridges, lr)
        return groups

    def forward_train(self, images, labels, index):
        z_target = self.student(images)
        f_target = self.student_taps.features()
        losses: dict[str, torch.Tensor] = {}
        for j, component in enumerate(self.teachers):
            attribute = self.student.attributes[j]
            with torch.no_grad():
                z_component = component(images)[:, 0]
                f_component = self.teacher_taps[j].features()
            losses[f"logit/{attribute}"] = F.mse_loss(z_target[:, j], z_component)
            if self.feature_loss:
                mapped = self.bridges[j](f_target)
                for tap, m, f in zip(TAP_LAYERS, mapped, f_component):
                    losses[f"feature/{attribute}/{tap}"] = F.mse_loss(m, f)
        return losses
