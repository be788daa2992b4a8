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

from .distributed import mean_over_processes
from .losses import TransferBridge, bridged_mse, per_sample_mse, unit_norm_penalty
from .models import TAP_LAYERS, AttributeResNet, FeatureTaps, fold_batchnorm

#: Learning-rate factor of the bridges at each tap, relative to the net's (METHOD.md:
#: 1e-4, 1e-4, 1e-5, 1e-4, 1e-4 with a net lr of 1e-4).
BRIDGE_LR_SCALE = (1.0, 1.0, 0.1, 1.0, 1.0)


class Method(nn.Module):
    """Base class: a student plus frozen ``teachers`` kept in eval mode by ``train()``.

    ``idle_parameters``: whether a training step may leave some parameters without a
    gradient (``DistributedDataParallel`` must then look for them). ``across_processes``:
    set by :func:`~kamal_attr.distributed.wrap` when every process runs the same steps on
    its part of each batch (DDP), so that a step may exchange figures with the others."""

    idle_parameters = False
    across_processes = False

    def __init__(self, student: AttributeResNet, teachers: Sequence[AttributeResNet] = (),
                 inputs: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.student = student
        # Frozen copies (eval mode, no gradients, BatchNorm folded); the caller's nets are
        # left as they are. ``inputs[i]`` feeds teacher i the input size and normalisation
        # it was trained on (:func:`~kamal_attr.models.input_adapter`; identity by default).
        self.teachers = nn.ModuleList(fold_batchnorm(t) for t in teachers)
        self.teacher_inputs = nn.ModuleList(inputs if inputs is not None
                                            else [nn.Identity() for _ in teachers])

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

    @torch.no_grad()
    def diagnostics(self, images: torch.Tensor) -> dict[str, float]:
        """Figures logged once per epoch on a fixed batch (none by default)."""
        return {}

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training step's losses (what ``DistributedDataParallel`` calls)."""
        return self.forward_train(images, labels, index)


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

        L = sum_i [sum_x w_xi l_i(x) / sum_x w_xi] + sum_i sum_b mean_j (||S_ibj||^2 - 1)^2

    where C_i / S_i are the component-/source-side bridges of source net i (1x1 convs to
    half the teacher's channels). Each source net's term is the (weighted) mean over the
    images routed to it, as in the port (which draws one batch per source net): dividing every term by
    the whole batch instead made the distillation S times weaker against the penalty, and
    the source-side bridges were trained mostly by the penalty. Teacher i runs only on the
    images with ``w_xi > 0``, so an image's loss reaches only the bridges of the source
    nets it is routed to.
    """

    def __init__(self, student: AttributeResNet, teachers: Sequence[AttributeResNet],
                 attribute: str, routing: torch.Tensor, feature_loss: bool = True,
                 inputs: Sequence[nn.Module] | None = None, penalty: bool = True) -> None:
        super().__init__(student, teachers, inputs)
        self.penalty = penalty
        if routing.shape[1] != len(teachers):
            raise ValueError("routing needs one column per source net")
        # Kept on the CPU (not a buffer): a step looks up its batch's rows by the loader's
        # CPU-side index and never waits for the device to learn who teaches which image.
        self.routing = routing.detach().float().cpu()
        # One-hot rows (min-entropy, random): each image is taught by one source net, with
        # weight 1, so a teacher's loss is the plain MSE over its chunk of the batch.
        self.one_hot = bool(((self.routing == 0) | (self.routing == 1)).all()
                            and (self.routing.sum(1) == 1).all())
        self.heads = [t.attributes.index(attribute) for t in teachers]  # any head, not only the first
        self.feature_loss = feature_loss
        # a batch may route no image to a source net: its bridges then get no gradient
        self.idle_parameters = self.one_hot and feature_loss
        self.student_taps = FeatureTaps(student)
        self.teacher_taps = [FeatureTaps(t) for t in self.teachers]
        if feature_loss:
            # Each teacher's own tap widths (ResNet-50: 64, 256, ..., 2048) to half of them,
            # and the student's to the same: mixed architectures meet in the bridges.
            half = [[c // 2 for c in t.tap_channels] for t in teachers]
            self.source_bridges = nn.ModuleList(
                TransferBridge(t.tap_channels, h) for t, h in zip(teachers, half))
            self.component_bridges = nn.ModuleList(TransferBridge(student.tap_channels, h)
                                                   for h in half)

    def parameter_groups(self, lr):
        groups = super().parameter_groups(lr)
        if self.feature_loss:
            groups += _bridge_groups(list(self.source_bridges) + list(self.component_bridges), lr)
        return groups

    def batch_plan(self, index: torch.Tensor) -> tuple[torch.Tensor | None, list[int], torch.Tensor]:
        """Who teaches which image of the batch, decided on the CPU from ``index``.

        Returns ``(order, counts, rows)``. With one-hot routing ``order`` sorts the batch by
        teacher and source net i teaches the next ``counts[i]`` images: each teacher runs
        on its own chunk, and chunks are ``split`` views, so nothing is gathered and the
        backward pass only concatenates. Otherwise (averaging: ``order`` None, ``counts``
        empty) every teacher sees the whole batch and ``rows`` ``(B, S)`` weighs its images.
        """
        rows = self.routing[index.cpu()]
        if not self.one_hot:
            return None, [], rows
        choice = rows.argmax(dim=1)
        order = torch.argsort(choice, stable=True)
        return order, torch.bincount(choice, minlength=rows.shape[1]).tolist(), rows

    def forward_train(self, images, labels, index):
        order, counts, rows = self.batch_plan(index)
        if order is not None:
            images = images[order.to(images.device, non_blocking=True)]
        z_student = self.student(images)[:, 0]
        f_student = self.student_taps.features()
        losses = (self._routed_losses(images, counts, z_student, f_student) if counts else
                  self._weighted_losses(images, rows, z_student, f_student))
        if self.feature_loss and self.penalty:
            losses["penalty"] = torch.stack([unit_norm_penalty(br) for br in self.source_bridges]).sum()
        return losses

    def _routed_losses(self, images: torch.Tensor, counts: list[int], z_student: torch.Tensor,
                       f_student: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One-hot routing: source net i runs on its chunk of the sorted batch only, and each
        tap's terms ``MSE(C_i f, S_i F_i)`` (the plain MSE over the chunk) come from one
        :func:`~kamal_attr.losses.bridged_mse`. On W processes each term is weighed by
        the chunk's size over its mean size over the processes (all processes' chunks
        together make the batch one process would take): DDP's average of the gradients
        is then that of the MSE over all of them, as in one process."""
        share = None  # one process: every weight is 1
        if self.across_processes:
            local = torch.tensor(counts, dtype=torch.float32)  # made on the CPU: no wait
            local = local.to(images.device, non_blocking=True)
            share = local / mean_over_processes(local).clamp_min(1e-12)
        losses = {"logit": images.new_zeros(())}
        taught: list[list[torch.Tensor] | None] = []  # each source net's taps, None if idle
        for i, (teacher, x, z) in enumerate(zip(self.teachers, images.split(counts),
                                                 z_student.split(counts))):
            if x.shape[0] == 0:
                taught.append(None)
                continue
            with torch.no_grad():
                z_teacher = teacher(self.teacher_inputs[i](x))[:, self.heads[i]]
                taught.append(self.teacher_taps[i].features())
            term = F.mse_loss(z, z_teacher)
            losses["logit"] = losses["logit"] + (term if share is None else term * share[i])
        if self.feature_loss:
            for b, tap in enumerate(TAP_LAYERS):
                terms = [(component.convs[b], None if f is None else f[b], source.convs[b])
                         for component, source, f in zip(self.component_bridges,
                                                         self.source_bridges, taught)]
                per_term = bridged_mse(f_student[b], counts, terms)
                losses[f"feature/{tap}"] = (per_term if share is None else per_term * share).sum()
        return losses

    def _weighted_losses(self, images: torch.Tensor, rows: torch.Tensor, z_student: torch.Tensor,
                         f_student: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted routing (averaging): every source net sees the whole batch; its term is
        ``sum_x w_xi MSE_x / sum_x w_xi``, on the same scale as a one-hot source net's. On W
        processes the denominator is the mean of the processes' sums (as for one-hot)."""
        if not self.across_processes:
            weights = (rows / rows.sum(0).clamp_min(1e-12)).to(images.device, non_blocking=True)
        else:
            rows = rows.to(images.device, non_blocking=True)
            weights = rows / mean_over_processes(rows.sum(0)).clamp_min(1e-12)
        losses = {"logit": images.new_zeros(())}
        if self.feature_loss:
            losses.update({f"feature/{tap}": images.new_zeros(()) for tap in TAP_LAYERS})
        for i, teacher in enumerate(self.teachers):
            with torch.no_grad():
                z_teacher = teacher(self.teacher_inputs[i](images))[:, self.heads[i]]
                f_teacher = self.teacher_taps[i].features()
            losses["logit"] = losses["logit"] + (weights[:, i] * per_sample_mse(z_student, z_teacher)).sum()
            if self.feature_loss:
                source_side = self.source_bridges[i](f_teacher)
                component_side = self.component_bridges[i](f_student)
                for tap, c, s in zip(TAP_LAYERS, component_side, source_side):
                    losses[f"feature/{tap}"] = losses[f"feature/{tap}"] + (
                        weights[:, i] * per_sample_mse(c, s)).sum()
        return losses

    @torch.no_grad()
    def diagnostics(self, images: torch.Tensor) -> dict[str, float]:
        """Root-mean-square output of the bridges at each tap, source side and component
        side, averaged over the source nets (every teacher sees the whole batch): without
        the unit-norm penalty both sides can shrink together and the feature loss with them."""
        if not self.feature_loss:
            return {}
        self.student(images)
        f_student = self.student_taps.features()
        sums = {f"bridge_rms/{side}/{tap}": 0.0 for side in ("source", "component") for tap in TAP_LAYERS}
        for i, teacher in enumerate(self.teachers):
            teacher(self.teacher_inputs[i](images))
            sides = {"source": self.source_bridges[i](self.teacher_taps[i].features()),
                     "component": self.component_bridges[i](f_student)}
            for side, outputs in sides.items():
                for tap, out in zip(TAP_LAYERS, outputs):
                    sums[f"bridge_rms/{side}/{tap}"] += out.float().pow(2).mean().sqrt().item()
        return {k: v / len(self.teachers) for k, v in sums.items()}


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
        self.teacher_taps = [FeatureTaps(c) for c in self.teachers]
        if feature_loss:
            self.bridges = nn.ModuleList(
                TransferBridge(student.tap_channels, c.tap_channels) for c in components)

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
                for tap, f, conv, g in zip(TAP_LAYERS, f_target, self.bridges[j].convs, f_component):
                    losses[f"feature/{attribute}/{tap}"] = bridged_mse(
                        f, [f.shape[0]], [(conv, g, None)])[0]
        return losses
