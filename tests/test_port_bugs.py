"""One test per bug of the reference port (METHOD.md) and per deviation the README states:
each fails, naming what broke, if the bug comes back."""
import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kamal_attr.celeba import CelebA
from kamal_attr.engine import OptimConfig, build_optimizer, build_scheduler, evaluate_accuracy, fit, predict
from kamal_attr.methods import SelectiveAmalgamation, SourceTraining
from kamal_attr.models import AttributeResNet
from kamal_attr.runtime import EpochShuffle

from conftest import write_celeba

REPO = Path(__file__).resolve().parent.parent


class ToyData(Dataset):
    """8 random 32-px images with one label; ``set_epoch`` as CelebA's (no augmentation)."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, 2, (n, 1), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i

    def set_epoch(self, epoch, seed):
        pass


class Recording(SourceTraining):
    """Supervised training that records, per step, the epoch's lr and whether it trains."""

    def __init__(self, model, optimizer_box):
        super().__init__(model)
        self.steps: list[tuple[float, bool]] = []
        self.box = optimizer_box

    def forward_train(self, images, labels, index):
        self.steps.append((self.box[0].param_groups[0]["lr"], self.student.training))
        return super().forward_train(images, labels, index)


class Scalars:
    """A SummaryWriter stand-in that keeps the scalars."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self):
        pass


def run_fit(schedule: OptimConfig, epochs: int):
    torch.manual_seed(0)
    box = []
    method = Recording(AttributeResNet(["Bangs"], 4), box)
    optimizer = build_optimizer(method.parameter_groups(schedule.lr), schedule)
    box.append(optimizer)
    scheduler = build_scheduler(optimizer, schedule, epochs)
    data = ToyData()
    loader = DataLoader(data, batch_size=4, sampler=EpochShuffle(data, num_replicas=1, rank=0, seed=0),
                        drop_last=True)
    writer = Scalars()
    fit(method, loader, DataLoader(data, batch_size=4), optimizer, scheduler, epochs,
        torch.device("cpu"), writer, lambda epoch, acc, figures: None)
    return method, optimizer, writer


@pytest.mark.parametrize("schedule, expected", [
    (OptimConfig("adam", 1e-3, schedule="step", milestones=(1, 2)), [1e-3, 5e-4, 2.5e-4]),
    (OptimConfig("adam", 1e-3, schedule="cosine"), [1e-3, 7.5e-4, 2.5e-4]),
])
def test_schedule_steps_once_per_epoch(schedule, expected):
    method, optimizer, writer = run_fit(schedule, epochs=3)
    per_step = [lr for lr, _ in method.steps]
    assert per_step == pytest.approx([lr for lr in expected for _ in range(2)]), (
        f"learning rate per step {per_step}: the scheduler must step once per epoch "
        "(never stepped, or stepped per iteration as in the port?)")
    assert [v for _, v in writer.scalars["lr"]] == pytest.approx(expected)


def test_every_epoch_trains_in_train_mode_on_all_batches():
    method, _, _ = run_fit(OptimConfig("adam", 1e-3), epochs=3)
    assert len(method.steps) == 3 * 2, "an epoch after the first saw fewer batches (exhausted iterator?)"
    assert all(training for _, training in method.steps), \
        "evaluation left the student in eval mode for the next epoch's training"


def test_evaluation_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    net = AttributeResNet(["Bangs"], 4).train()
    for m in net.modules():  # statistics far from any batch's, so a train-mode pass would move them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(ToyData(), batch_size=4)
    logits, _ = predict(net, loader, torch.device("cpu"))
    evaluate_accuracy(net, loader, torch.device("cpu"))
    moved = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert not moved, f"evaluation changed {moved[:3]}: predict ran the net in train mode"
    with torch.no_grad():
        expected = net.eval()(ToyData().images)
    assert torch.allclose(logits, expected, atol=1e-5), "predictions were not made in eval mode"


class RecordingTeacher(AttributeResNet):
    """A teacher that keeps every batch it is shown."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return super().forward(x)


def test_routing_scores_the_unaugmented_view(tmp_path):
    from kamal_attr.config import resolve_config
    from kamal_attr.routing import compute_routing
    import train
    write_celeba(tmp_path, n=12)
    rng = np.random.default_rng(0)
    for image in (tmp_path / "img_align_celeba").iterdir():  # texture, so that crops differ
        Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(image)
    cfg = resolve_config(train.get_args_parser().parse_args(
        ["--data_root", str(tmp_path), "--image_size", "32", "--batch_size", "4", "--workers", "0",
         "--device", "cpu", "--save_root", str(tmp_path / "out")]))
    augmented = CelebA(tmp_path, "train", ["Bangs"], 32, train=True)
    augmented.set_epoch(1, 0)
    assert not torch.equal(augmented[0][0], augmented.view(train=False)[0][0])  # detectable
    teacher = RecordingTeacher(["Bangs"], 4)
    first = compute_routing([teacher], "Bangs", augmented, cfg)
    shown = torch.cat(teacher.seen)
    eval_view = torch.stack([augmented.view(train=False)[i][0] for i in range(len(augmented))])
    assert torch.equal(shown, eval_view), "routing scored augmented images, not the eval view"
    assert torch.equal(first[0], compute_routing([teacher], "Bangs", augmented, cfg)[0])


def test_routing_lists_are_rewritten_not_appended(tmp_path):
    from kamal_attr.attributes import source_nets_of
    from kamal_attr.routing import write_routing
    specs = [s.name for s in source_nets_of("hair", "Black_Hair")]
    files = [Path(f"{i:06d}.jpg") for i in range(1, 5)]
    write_routing(tmp_path, specs, files, torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    paths = write_routing(tmp_path, specs, files, torch.tensor([[0.0, 1], [1, 0], [0, 1], [1, 0]]))
    lists = [p.read_text().split() for p in paths]
    assert lists == [["000002.jpg", "000004.jpg"], ["000001.jpg", "000003.jpg"]], \
        f"routing lists {lists} after two runs: a second run must rewrite them, not append"


def selective(routing):
    torch.manual_seed(0)
    teachers = [AttributeResNet(["Bangs", "Male"], 8), AttributeResNet(["Young", "Bangs"], 8)]
    return SelectiveAmalgamation(AttributeResNet(["Bangs"], 4), teachers, "Bangs", routing).train()


def test_stage1_loss_weighs_each_image_by_its_routing_weight():
    """Each source net's term is the weighted mean of its per-image losses: an image with
    three times another's weight counts three times as much."""
    from kamal_attr.losses import per_sample_mse
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    index = torch.arange(4)
    routing = torch.tensor([[0.25, 0.75], [0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
    method = selective(routing)
    logit = method.forward_train(images, None, index)["logit"].item()
    z_student = method.student(images)[:, 0]
    expected = 0.0
    with torch.no_grad():
        for i, teacher in enumerate(method.teachers):
            losses = per_sample_mse(z_student, teacher(images)[:, method.heads[i]])
            expected += (routing[:, i] * losses).sum().item() / routing[:, i].sum().item()
    assert logit == pytest.approx(expected, rel=1e-5), (
        f"stage-1 logit loss with routing weights is {logit:.5f}, not the sum over source nets "
        f"of their weighted means {expected:.5f}: weights ignored?")
    # one teacher for every image: the port's per-source-net mean over its own batch
    method = selective(torch.tensor([[1.0, 0.0]] * 4))
    logit = method.forward_train(images, None, index)["logit"].item()
    with torch.no_grad():
        z_teacher = method.teachers[0](images)[:, 0]
    z_student = method.student(images)[:, 0]
    assert logit == pytest.approx(nn.functional.mse_loss(z_student, z_teacher).item(), rel=1e-5)


def test_each_stage_has_its_own_optimiser_and_scheduler(tmp_path):
    """Two nets trained one after the other each follow their own schedule (the port built
    stage 2's scheduler on stage 1's optimiser, so the target's learning rate never decayed)."""
    from dataclasses import replace
    from kamal_attr.checkpoint import TrainingPlan, load_checkpoint
    from kamal_attr.config import resolve_config
    from kamal_attr.stages import train_net
    import train
    write_celeba(tmp_path, n=24)
    cfg = resolve_config(train.get_args_parser().parse_args(
        ["--data_root", str(tmp_path), "--image_size", "32", "--batch_size", "4", "--workers", "0",
         "--device", "cpu", "--save_root", str(tmp_path / "out")]))
    schedule = OptimConfig("adam", 1e-3, schedule="step", milestones=(1,), gamma=0.1)
    data = CelebA(tmp_path, "train", ["Bangs"], 32, train=True)
    for k in range(2):
        out = tmp_path / f"net{k}"
        plan = TrainingPlan(out, out / "epoch_002.pth", done=False)
        train_net(SourceTraining(AttributeResNet(["Bangs"], 4)), plan, {"k": k}, cfg, f"net{k}", 2,
                  replace(schedule), 0, data, data, tmp_path / f"run{k}", {"kind": "source"})
        last = load_checkpoint(out / "last.pth")
        assert [g["lr"] for g in last["optimizer"]["param_groups"]] == pytest.approx([1e-4]), \
            f"net {k}: its learning rate did not follow its own schedule"
        assert last["scheduler"]["last_epoch"] == 2


def test_no_hard_coded_device_or_absolute_path():
    sources = list((REPO / "kamal_attr").glob("*.py")) + list(REPO.glob("*.py"))
    for path in sources:
        text = path.read_text()
        assert ".cuda(" not in text, f"{path.name} hard-codes .cuda()"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.match(r"^(/(home|root|data|mnt|tmp|usr|opt)\b|[A-Z]:\\)", node.value), \
                    f"{path.name} hard-codes the absolute path {node.value!r}"
        if path.name != "config.py":  # default_device() is the one place that picks CUDA
            assert not re.search(r"torch\.device\([\"']cuda", text), f"{path.name} hard-codes a CUDA device"
