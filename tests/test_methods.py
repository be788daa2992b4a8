import pytest
import torch
import torch.nn.functional as F

from kamal_attr.methods import SelectiveAmalgamation, SourceTraining, TargetAmalgamation
from kamal_attr.models import AttributeResNet


def nets(seed=0):
    torch.manual_seed(seed)
    teachers = [AttributeResNet(["Bangs", "Male"], 8), AttributeResNet(["Young", "Bangs"], 8)]
    return AttributeResNet(["Bangs"], 4), teachers


def grad_norm(module):
    grads = [p.grad.abs().sum() for p in module.parameters() if p.grad is not None]
    return float(sum(grads)) if grads else 0.0


def test_a_sample_reaches_only_the_bridges_of_its_source_net():
    student, teachers = nets()
    routing = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    method = SelectiveAmalgamation(student, teachers, "Bangs", routing).train()
    images = torch.randn(2, 3, 32, 32)
    parts = method.forward_train(images, torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 1]))
    assert set(parts) == {"logit", "penalty", "feature/conv1", "feature/layer1", "feature/layer2",
                          "feature/layer3", "feature/layer4"}
    (sum(parts.values()) - parts["penalty"]).backward()  # the distillation part alone
    assert grad_norm(method.component_bridges[0]) > 0 and grad_norm(method.source_bridges[0]) > 0
    assert grad_norm(method.component_bridges[1]) == 0 and grad_norm(method.source_bridges[1]) == 0
    assert all(p.grad is None for t in method.teachers for p in t.parameters())


def test_teacher_head_is_the_component_attribute():
    student, teachers = nets()
    method = SelectiveAmalgamation(student, teachers, "Bangs", torch.eye(2))
    assert method.heads == [0, 1]


def test_average_selection_uses_every_teacher():
    student, teachers = nets()
    method = SelectiveAmalgamation(student, teachers, "Bangs", torch.full((2, 2), 0.5)).train()
    parts = method.forward_train(torch.randn(2, 3, 32, 32), torch.zeros(2, 1, dtype=torch.long),
                                 torch.tensor([0, 1]))
    (sum(parts.values()) - parts["penalty"]).backward()
    assert all(grad_norm(b) > 0 for b in method.component_bridges)


def test_logits_only_ablation_has_no_bridges():
    student, teachers = nets()
    method = SelectiveAmalgamation(student, teachers, "Bangs", torch.eye(2), feature_loss=False)
    parts = method.forward_train(torch.randn(2, 3, 32, 32), None, torch.tensor([0, 1]))
    assert set(parts) == {"logit"}
    assert not hasattr(method, "source_bridges")


def test_teachers_stay_frozen_in_eval_mode():
    student, teachers = nets()
    method = SelectiveAmalgamation(student, teachers, "Bangs", torch.eye(2))
    before = [t.bn1.running_mean.clone() for t in method.teachers]
    optimizer = torch.optim.SGD([p for g in method.parameter_groups(0.1) for p in g["params"]], lr=0.1)
    method.train()
    assert method.student.training and not any(t.training for t in method.teachers)
    for _ in range(2):
        parts = method.forward_train(torch.randn(2, 3, 32, 32), None, torch.tensor([0, 1]))
        optimizer.zero_grad()
        sum(parts.values()).backward()
        optimizer.step()
    assert all(torch.equal(b, t.bn1.running_mean) for b, t in zip(before, method.teachers))
    assert not any(p.requires_grad for t in method.teachers for p in t.parameters())
    trainable = {id(p) for g in method.parameter_groups(0.1) for p in g["params"]}
    assert not trainable & {id(p) for t in method.teachers for p in t.parameters()}


def test_bridge_learning_rates_per_tap():
    student, teachers = nets()
    groups = SelectiveAmalgamation(student, teachers, "Bangs", torch.eye(2)).parameter_groups(1e-4)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-4, 1e-4, 1e-5, 1e-4, 1e-4])


def test_target_loss_touches_every_component():
    torch.manual_seed(0)
    components = [AttributeResNet([a], 4) for a in ("Bangs", "Young", "Male")]
    target = AttributeResNet(["Bangs", "Young", "Male"], 6)
    method = TargetAmalgamation(target, components).train()
    parts = method.forward_train(torch.randn(2, 3, 32, 32), None, None)
    assert {k.split("/")[1] for k in parts} == {"Bangs", "Young", "Male"}
    sum(parts.values()).backward()
    assert all(grad_norm(b) > 0 for b in method.bridges)
    assert all(target.heads.weight.grad[2 * j:2 * j + 2].abs().sum() > 0 for j in range(3))


def test_source_training_is_cross_entropy_per_head():
    model = AttributeResNet(["Bangs", "Male"], 4).eval()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([[0, 1], [1, 1], [0, 0]])
    loss = SourceTraining(model).forward_train(images, labels, None)["ce"]
    logits = model(images)
    expected = sum(torch.nn.functional.cross_entropy(logits[:, k], labels[:, k]) for k in range(2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_non_finite_loss_stops_training():
    from kamal_attr import KamalError
    from kamal_attr.engine import train_one_epoch

    class Broken(SourceTraining):
        def forward_train(self, images, labels, index):
            return {"ce": self.student(images).sum() * float("nan")}

    model = AttributeResNet(["Bangs"], 4)
    batches = [(torch.randn(2, 3, 32, 32), torch.zeros(2, 1, dtype=torch.long), torch.arange(2))]
    with pytest.raises(KamalError, match="loss is nan at epoch 1 step 0"):
        train_one_epoch(Broken(model), batches, torch.optim.SGD(model.parameters(), 0.1),
                        torch.device("cpu"), epoch=1)


def test_folded_teachers_give_the_same_outputs_and_taps():
    from kamal_attr.models import TAP_LAYERS, FeatureTaps, fold_batchnorm
    _, (teacher, _) = nets()
    for m in teacher.modules():  # BatchNorm statistics as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    teacher.eval()
    folded = fold_batchnorm(teacher)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.layer1.modules())
    taps, folded_taps = FeatureTaps(teacher), FeatureTaps(folded)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), folded(x), atol=1e-5)
    for name, a, b in zip(TAP_LAYERS, taps.features(), folded_taps.features()):
        assert torch.allclose(a, b, atol=1e-5), f"tap {name} changed by folding"


def test_stage1_loss_is_the_sum_over_source_nets_of_their_mean_over_their_images():
    """As in the port (one batch per source net, each term a mean over it): sorting the batch
    by teacher and splitting it gives sum_i mean_{x routed to i} MSE_x, computed image by
    image here. Dividing each term by the whole batch instead made the distillation S
    times weaker against the penalty (issue 11); with 1 and 3 images per teacher, that
    would give a quarter of the first term and three quarters of the second."""
    from kamal_attr.losses import per_sample_mse
    student, teachers = nets()
    routing = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    method = SelectiveAmalgamation(student, teachers, "Bangs", routing).train()
    images = torch.randn(4, 3, 32, 32)
    parts = method.forward_train(images, None, torch.arange(4))
    z = method.student(images)[:, 0]  # train-mode BN over the whole batch, as in the step
    per_teacher = {0: [], 1: []}
    for n in range(4):
        i = int(routing[n].argmax())
        with torch.no_grad():
            zt = method.teachers[i](images[n:n + 1])[:, method.heads[i]]
        per_teacher[i].append(per_sample_mse(z[n:n + 1], zt).sum().item())
    expected = sum(sum(v) / len(v) for v in per_teacher.values())
    assert parts["logit"].item() == pytest.approx(expected, rel=1e-5)
    averaged = SelectiveAmalgamation(student, teachers, "Bangs", torch.full((4, 2), 0.5)).train()
    parts = averaged.forward_train(images, None, torch.arange(4))
    with torch.no_grad():
        full = [per_sample_mse(z, t(images)[:, h]).mean().item()
                for t, h in zip(averaged.teachers, averaged.heads)]
    assert parts["logit"].item() == pytest.approx(sum(full), rel=1e-5)  # each a mean over the batch


def test_no_penalty_ablation_drops_only_the_penalty_and_bridges_can_shrink():
    student, teachers = nets()
    method = SelectiveAmalgamation(student, teachers, "Bangs", torch.eye(2), penalty=False).train()
    parts = method.forward_train(torch.randn(2, 3, 32, 32), None, torch.tensor([0, 1]))
    assert "penalty" not in parts and "feature/layer4" in parts
    before = method.eval().diagnostics(torch.randn(4, 3, 32, 32))
    assert set(before) == {f"bridge_rms/{side}/{tap}" for side in ("source", "component")
                           for tap in ("conv1", "layer1", "layer2", "layer3", "layer4")}
    for bridge in list(method.source_bridges) + list(method.component_bridges):
        for conv in bridge.convs:  # both sides shrunk together: the feature loss shrinks too
            conv.weight.data.mul_(0.1)
            conv.bias.data.mul_(0.1)
    after = method.diagnostics(torch.randn(4, 3, 32, 32))
    assert all(after[k] < before[k] for k in before)


def _old_stage1_parts(method, images, index):
    """Stage 1 (one-hot) as it was computed before bridged_mse: autograd through each source
    net's bridges on its chunk of every tap, one mse_loss per chunk."""
    from kamal_attr.losses import apply_bridge, unit_norm_penalty
    from kamal_attr.models import TAP_LAYERS
    order, counts, _ = method.batch_plan(index)
    images = images[order]
    z = method.student(images)[:, 0]
    taps = list(zip(*(f.split(counts) for f in method.student_taps.features())))
    parts = {"logit": images.new_zeros(()), **{f"feature/{t}": images.new_zeros(()) for t in TAP_LAYERS}}
    for i, (teacher, x, zi) in enumerate(zip(method.teachers, images.split(counts), z.split(counts))):
        if x.shape[0] == 0:
            continue
        with torch.no_grad():
            zt = teacher(x)[:, method.heads[i]]
            ft = method.teacher_taps[i].features()
        parts["logit"] = parts["logit"] + F.mse_loss(zi, zt)
        source_side = [apply_bridge(c, f) for c, f in zip(method.source_bridges[i].convs, ft)]
        component_side = [apply_bridge(c, f) for c, f in zip(method.component_bridges[i].convs, taps[i])]
        for tap, c, s in zip(TAP_LAYERS, component_side, source_side):
            parts[f"feature/{tap}"] = parts[f"feature/{tap}"] + F.mse_loss(c, s)
    parts["penalty"] = torch.stack([unit_norm_penalty(br) for br in method.source_bridges]).sum()
    return parts


def _old_stage2_parts(method, images, index):
    """Stage 2 as it was computed before bridged_mse: every component's bridges, then
    one mse_loss per tap."""
    from kamal_attr.losses import apply_bridge
    from kamal_attr.models import TAP_LAYERS
    z = method.student(images)
    f = method.student_taps.features()
    parts = {}
    for j, component in enumerate(method.teachers):
        a = method.student.attributes[j]
        with torch.no_grad():
            zc = component(images)[:, 0]
            fc = method.teacher_taps[j].features()
        parts[f"logit/{a}"] = F.mse_loss(z[:, j], zc)
        mapped = [apply_bridge(c, x) for c, x in zip(method.bridges[j].convs, f)]
        for tap, m, g in zip(TAP_LAYERS, mapped, fc):
            parts[f"feature/{a}/{tap}"] = F.mse_loss(m, g)
    return parts


@pytest.mark.parametrize("stage,batch", [("stage 1", 6), ("stage 2", 3), ("stage 2", 1)])
def test_stage_gradients_are_bitwise_those_of_the_plain_formulation(stage, batch):
    """The feature loss's fused computation (losses.bridged_mse) changes no number: on
    channels-last nets and images, as training runs them, a step's gradients are bitwise
    those of autograd through the bridges, summed as the training loop sums the parts.
    Stage 1's batch has a source net with one image and one with none."""
    from kamal_attr.engine import place
    routing = torch.tensor([[0.0, 1.0, 0.0]] + [[1.0, 0.0, 0.0]] * 5)  # net 1: one image; net 2: none
    hair = ["Black_Hair", "Bangs"]

    def build():
        torch.manual_seed(0)
        # widths of 16: oneDNN's channels-last 1x1 weight gradient corrupts the heap at
        # widths 4-8 with batches this small (a plain supervised step does it too)
        if stage == "stage 1":
            teachers = [AttributeResNet(["Bangs"], 8) for _ in range(3)]
            method = SelectiveAmalgamation(AttributeResNet(["Bangs"], 16), teachers, "Bangs", routing)
        else:
            method = TargetAmalgamation(AttributeResNet(hair, 16), [AttributeResNet([a], 8) for a in hair])
        return place(method, torch.device("cpu")).train()
    images = torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    index = torch.arange(batch)
    old_parts = _old_stage1_parts if stage == "stage 1" else _old_stage2_parts
    grads = []
    for parts_of in (lambda m: m.forward_train(images, None, index), lambda m: old_parts(m, images, index)):
        method = build()
        torch.stack(list(parts_of(method).values())).sum().backward()  # as the training loop sums
        grads.append({n: p.grad for n, p in method.named_parameters() if p.requires_grad})
    new, old = grads
    differ = [n for n in new if (new[n] is None) != (old[n] is None)
              or (new[n] is not None and not torch.equal(new[n], old[n]))]
    assert not differ, f"gradients differ from the plain formulation: {differ[:4]}"
    if stage == "stage 1":  # the idle source net's bridges are left out, as before
        assert all(new[n] is None for n in new if n.startswith("component_bridges.2."))


def test_every_stage_trains_and_predicts_under_bf16_autocast(monkeypatch):
    """The GPU's mixed precision, on the CPU's bf16 autocast (the training loop's own code,
    its autocast pointed at the CPU): every stage's step runs (stage 1 with one-hot and with
    weighted routing) with its convolutions in bf16 and its heads in float32, its loss parts
    are finite float32, every parameter that takes part gets a float32 gradient, and
    predictions come out float32."""
    import contextlib

    import kamal_attr.engine as engine
    monkeypatch.setattr(engine, "autocast", lambda device, bf16: torch.autocast(
        "cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 2)), torch.arange(4) + 4 * k)
               for k in range(2)]
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 4)
    weighted = torch.tensor([[0.7, 0.3]] * 8)

    def stage1(routing):
        return SelectiveAmalgamation(AttributeResNet(["Bangs"], 16),
                                     [AttributeResNet(["Bangs", "Smiling"], 16) for _ in range(2)],
                                     "Bangs", routing)
    methods = {"source": SourceTraining(AttributeResNet(["Bangs", "Smiling"], 16)),
               "stage 1, one-hot": stage1(one_hot), "stage 1, weighted": stage1(weighted),
               "stage 2": TargetAmalgamation(AttributeResNet(["Bangs", "Smiling"], 16),
                                             [AttributeResNet([a], 16) for a in ["Bangs", "Smiling"]])}
    for name, method in methods.items():
        engine.place(method, cpu)
        optimizer = engine.build_optimizer(method.parameter_groups(1e-3),
                                           engine.OptimConfig("adam", 1e-3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parts = method.train()(*batches[0])
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values()), name
        dtypes = []  # the student's last features and logits in the loop's steps
        hooks = [m.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
                 for m in (method.student.layer4, method.student)]
        stats = engine.train_one_epoch(method, batches, optimizer, cpu, 1, bf16=True)
        for hook in hooks:
            hook.remove()
        assert dtypes == [torch.bfloat16, torch.float32] * 2, name
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), name
        grads = [p.grad for p in method.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads), name
        (logits,), _ = engine.predict_many([method.student], batches, cpu, bf16=True)
        assert logits.dtype == torch.float32 and logits.shape[0] == 8, name
