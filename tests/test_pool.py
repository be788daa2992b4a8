"""Customization (issue 10): a teacher pool of mixed architectures, any attribute set,
bridges between ResNet-18/34/50 taps, parameters and FLOPs, and predicting with a student."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train
import train_sourcenet
from kamal_attr import KamalError
from kamal_attr.attributes import source_nets_of
from kamal_attr.checkpoint import atomic_save, load_checkpoint, net_record
from kamal_attr.methods import SelectiveAmalgamation, TargetAmalgamation
from kamal_attr.models import (AttributeResNet, InputAdapter, check_tap_sizes, net_cost,
                               tap_channels, tap_shapes)
from kamal_attr.pool import coverage, discover_pool, pool_task, preset_task, select_source_nets

REPO = Path(__file__).resolve().parent.parent


def save_source(path: Path, attributes, arch="resnet18", width=4, epoch=1, epochs=1, **extra):
    net = AttributeResNet(attributes, width, arch)
    atomic_save(net_record("source", net, 32, epoch, {"epochs": epochs}, **extra), path)
    return net


def test_pool_finds_source_nets_at_any_depth_and_passes_over_the_rest(tmp_path):
    save_source(tmp_path / "a/deep/r18/epoch_001.pth", ["Male", "Smiling"])
    save_source(tmp_path / "a/deep/r18/epoch_002.pth", ["Male", "Smiling"], epoch=2, epochs=2)
    save_source(tmp_path / "r34/epoch_003.pth", ["Smiling"], "resnet34", epoch=3, epochs=3)
    save_source(tmp_path / "downloaded.pth", ["Bangs"], "resnet50")
    # torch's legacy (non-zip) format cannot be memory-mapped: the scan reads it whole
    torch.save(load_checkpoint(tmp_path / "downloaded.pth"), tmp_path / "downloaded.pth",
               _use_new_zipfile_serialization=False)
    save_source(tmp_path / "busy/epoch_002.pth", ["Young"], epoch=2, epochs=5)  # still training
    atomic_save(load_checkpoint(tmp_path / "busy/epoch_002.pth"), tmp_path / "busy/last.pth")
    component = AttributeResNet(["Male"], 4)
    atomic_save(net_record("component", component, 32, 1, {}), tmp_path / "c/epoch_001.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pth")
    save_source(tmp_path / "r34.pth", ["Male"])  # a file beside the folder r34/: another net
    save_source(tmp_path / "odd/epoch_best.pth", ["Male"])  # not an epoch: a file of its own
    save_source(tmp_path / "broken/epoch_002.pth", ["Male"], epoch=2, epochs=2)
    (tmp_path / "broken/last.pth").write_bytes(b"not a checkpoint")
    record = load_checkpoint(tmp_path / "r34.pth")
    del record["attributes"]
    atomic_save(record, tmp_path / "headless.pth")  # ours by its format, but no heads
    entries, notes = discover_pool(tmp_path, save_epoch=1)
    found = {e.name: (e.record["arch"], e.record["epoch"]) for e in entries}
    assert found == {"a/deep/r18": ("resnet18", 1), "r34": ("resnet34", 3), "r34.pth": ("resnet18", 1),
                     "downloaded.pth": ("resnet50", 1), "odd/epoch_best.pth": ("resnet18", 1)}, found
    assert any("busy: still training" in n for n in notes), notes
    assert any("broken: passed over, cannot load" in n for n in notes), notes
    assert any("c: passed over, a component net" in n for n in notes), notes
    assert any("foreign.pth: passed over" in n and "not a kamal_attr checkpoint" in n for n in notes)
    assert any("headless.pth: passed over" in n and "its record lacks attributes" in n for n in notes)
    assert coverage(entries) == {"Bangs": 1, "Male": 3, "Smiling": 2}


def test_a_run_from_the_pool_says_which_files_it_passed_over(tmp_path, caplog):
    save_source(tmp_path / "good/epoch_001.pth", ["Male"])
    whole = (tmp_path / "good/epoch_001.pth").read_bytes()
    (tmp_path / "downloaded.pth").write_bytes(whole[:len(whole) // 2])  # a download cut short
    with caplog.at_level("WARNING", logger="kamal_attr"):
        task = pool_task("mine", ["Male"], tmp_path, save_epoch=1)
    assert [t.name for t in task.teachers["Male"]] == ["good"]
    assert "teacher pool: downloaded.pth: passed over, cannot load" in caplog.text


def test_a_net_on_repeated_attributes_gets_each_head_once():
    spec, = select_source_nets(None, None, False, None, ["Smiling", "Male", "Smiling"], None)
    assert spec.attributes == ("Smiling", "Male")


def test_a_teacher_serves_every_head_it_has_and_uncovered_attributes_stop(tmp_path):
    save_source(tmp_path / "first/epoch_001.pth", ["Male", "Smiling", "Young"])
    save_source(tmp_path / "second/epoch_001.pth", ["Young"], "resnet34")
    task = pool_task("mine", ["Young", "Smiling"], tmp_path, 1)
    assert [t.name for t in task.teachers["Young"]] == ["first", "second"]
    assert [t.name for t in task.teachers["Smiling"]] == ["first"]  # its second head
    with pytest.raises(KamalError, match=r"no teacher in the pool covers Bangs, Eyeglasses; "
                       r"the pool \(2 source nets under .*\) covers: Male \(1\), Smiling \(1\), Young \(2\)"):
        pool_task("mine", ["Bangs", "Young", "Eyeglasses"], tmp_path, 1)


def test_a_non_first_head_is_what_the_component_learns_from():
    torch.manual_seed(0)
    teacher = AttributeResNet(["Male", "Young", "Bangs"], 4).eval()
    student = AttributeResNet(["Bangs"], 4)
    method = SelectiveAmalgamation(student, [teacher], "Bangs", torch.ones(4, 1),
                                   feature_loss=False).train()
    images = torch.randn(4, 3, 32, 32)
    loss = method(images, torch.zeros(4, 1, dtype=torch.long), torch.arange(4))["logit"]
    with torch.no_grad():  # the student in training mode, as in the step
        z_student, z_teacher = student(images)[:, 0], teacher(images)
    mse = torch.nn.functional.mse_loss
    assert method.heads == [2]
    assert torch.allclose(loss, mse(z_student, z_teacher[:, 2]), atol=1e-5)
    assert not torch.allclose(loss, mse(z_student, z_teacher[:, 0]), atol=1e-3)


@pytest.mark.parametrize("arch, channels", [("resnet18", (64, 64, 128, 256, 512)),
                                            ("resnet34", (64, 64, 128, 256, 512)),
                                            ("resnet50", (64, 256, 512, 1024, 2048))])
def test_tap_widths_of_torchvision_resnets(arch, channels):
    import torchvision
    net = AttributeResNet(["Male"], 64, arch)
    assert tap_channels(64, arch) == channels == net.tap_channels
    assert [s[0] for s in tap_shapes(net, 64)] == list(channels)
    reference = getattr(torchvision.models, arch)()  # same parameter names and shapes
    ours = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("heads.")}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert ours == theirs


def test_bridges_join_mixed_architectures_in_both_stages():
    torch.manual_seed(0)
    teachers = [AttributeResNet(["Bangs"], 4, "resnet50"), AttributeResNet(["Male", "Bangs"], 6, "resnet34")]
    student = AttributeResNet(["Bangs"], 4, "resnet18")
    method = SelectiveAmalgamation(student, teachers, "Bangs", torch.eye(2)[[0, 1, 0, 1]]).train()
    shapes = lambda bridge: [tuple(c.weight.shape[:2]) for c in bridge.convs]  # noqa: E731
    assert shapes(method.source_bridges[0]) == [(2, 4), (8, 16), (16, 32), (32, 64), (64, 128)]
    assert shapes(method.component_bridges[0]) == [(2, 4), (8, 4), (16, 8), (32, 16), (64, 32)]
    assert shapes(method.component_bridges[1]) == [(3, 4), (3, 4), (6, 8), (12, 16), (24, 32)]
    losses = method(torch.randn(4, 3, 32, 32), torch.zeros(4, 1, dtype=torch.long), torch.arange(4))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    target = AttributeResNet(["Bangs", "Male"], 6, "resnet50")
    components = [AttributeResNet(["Bangs"], 4, "resnet34"), AttributeResNet(["Male"], 4, "resnet18")]
    stage2 = TargetAmalgamation(target, components).train()
    assert shapes(stage2.bridges[0]) == [(4, 6), (4, 24), (8, 48), (16, 96), (32, 192)]
    sum(stage2(torch.randn(2, 3, 32, 32), None, torch.arange(2)).values()).backward()


def test_teachers_of_another_input_size_are_fed_their_own_and_taps_must_agree():
    student = AttributeResNet(["Bangs"], 4)
    check_tap_sizes(student, 64, [("same", AttributeResNet(["Bangs"], 8, "resnet50"), 64)])
    with pytest.raises(KamalError, match=r"teacher big \(resnet34, 128 px\) has taps of 64x64, .*"
                       r"the student at 64 px has 32x32, .*pass --image_size 128, or pass --no_feature_loss"):
        check_tap_sizes(student, 64, [("big", AttributeResNet(["Bangs"], 4, "resnet34"), 128)])
    with pytest.raises(KamalError, match="trained at 64, 128 px, so no one --image_size fits them "
                                         "all: use teachers of one size, or pass --no_feature_loss"):
        check_tap_sizes(student, 64, [("same", AttributeResNet(["Bangs"], 4), 64),
                                      ("big", AttributeResNet(["Bangs"], 4, "resnet34"), 128)])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    adapter = InputAdapter(16, mean, std, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = torch.rand(1, 3, 8, 8)
    student_view = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    fed = adapter(student_view)
    assert fed.shape == (1, 3, 16, 16)
    resized = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bilinear", antialias=True)
    assert torch.allclose(fed, (resized - 0.5) / 0.25, atol=1e-5)


def test_parameters_and_flops_are_counted_by_torch():
    cost = net_cost(AttributeResNet(["Male"], 64), 224)
    assert cost["params"] == 11_177_538  # torchvision's resnet18 less its fc, plus one 2-way head
    assert 3600 < cost["mflops"] < 3700  # 1.82 G multiply-adds


def test_group_presets_keep_their_teachers_and_folders(tmp_path):
    task = preset_task("hair", 40, tmp_path)
    assert task.name == "hair" and task.attributes == ("Black_Hair", "Blond_Hair", "Brown_Hair", "Bangs")
    for attribute in task.attributes:
        specs = source_nets_of("hair", attribute)
        assert [(t.key, t.name, t.path) for t in task.teachers[attribute]] == [
            (str(s.source_id), s.name, tmp_path / "hair" / s.name / "epoch_040.pth") for s in specs]
    assert task.routing_folder(tmp_path, "entropy", "Bangs") == tmp_path / "hair" / "entropy"


def common(root: Path, data: Path) -> list[str]:
    return ["--data_root", str(data), "--save_root", str(root), "--image_size", "32",
            "--batch_size", "6", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def custom(tmp_path_factory, synthetic_root):
    """A ResNet-18 and a ResNet-34 teacher made by train_sourcenet.py, amalgamated by
    train.py --attributes into a student for two attributes (1 epoch each)."""
    root = tmp_path_factory.mktemp("custom")
    args = common(root, synthetic_root)
    for name, arch, attributes in (("r18", "resnet18", ["Male", "Bangs"]),
                                   ("r34", "resnet34", ["Bangs"])):
        train_sourcenet.main(train_sourcenet.get_args_parser().parse_args(
            ["--attributes", *attributes, "--name", name, "--arch", arch, "--epochs", "1",
             "--width", "4", "--pretrained", "none"] + args))
    select = ["--attributes", "Bangs", "Male", "--name", "mine", "--sorce_saveEpoch", "1",
              "--component_saveEpoch", "1", "--target_epoch", "1"] + args
    train.main(train.get_args_parser().parse_args(select + ["--width", "4", "--target_width", "6",
                                                            "--target_arch", "resnet34"]))
    return root, select


def test_a_student_for_any_attributes_from_mixed_teachers(custom, capsys):
    root, select = custom
    component = load_checkpoint(root / "snapshot/components/mine/entropy/Bangs/epoch_001.pth")
    assert sorted(component["recipe"]["teachers"]) == ["custom/r18", "custom/r34"]
    male = load_checkpoint(root / "snapshot/components/mine/entropy/Male/epoch_001.pth")
    assert sorted(male["recipe"]["teachers"]) == ["custom/r18"]
    target = load_checkpoint(root / "snapshot/target/mine/entropy/epoch_001.pth")
    assert target["attributes"] == ["Bangs", "Male"] and target["arch"] == "resnet34"
    assert (root / "data/sources/mine/entropy/Bangs/custom__r34.txt").is_file()
    capsys.readouterr()
    evaluate.main(evaluate.get_args_parser().parse_args(select + ["--json", str(root / "e.json")]))
    out = capsys.readouterr().out
    assert "mine group, test split, entropy" in out and "target vs its 2 teachers together" in out
    result = json.loads((root / "e.json").read_text())
    assert list(result["attributes"]["Bangs"]["sources"]) == ["1", "2"]
    assert list(result["attributes"]["Male"]["sources"]) == ["1"]
    assert result["nets"]["source 2"]["arch"] == "resnet34" and result["nets"]["source 2"]["name"] == "custom/r34"
    assert result["cost"]["teachers_sum"]["params"] == sum(
        result["nets"][f"source {k}"]["params"] for k in (1, 2))
    assert result["cost"]["target"]["params"] == result["nets"]["target"]["params"] > 0


def test_evaluate_reads_the_targets_heads_by_name_in_any_order_or_subset(custom, tmp_path):
    root, select = custom
    figures = {}
    for order in (["Bangs", "Male"], ["Male", "Bangs"], ["Male"]):
        out = tmp_path / f"{'-'.join(order)}.json"
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--attributes", *order, *select[3:], "--json", str(out)]))
        rows = json.loads(out.read_text())["attributes"]
        figures["-".join(order)] = {a: (r["target"], r["component"]) for a, r in rows.items()}
    assert figures["Male-Bangs"] == figures["Bangs-Male"]
    assert figures["Male"]["Male"] == figures["Bangs-Male"]["Male"]
    other = root / "snapshot/target/other/entropy/epoch_001.pth"  # a target for Bangs alone
    atomic_save(net_record("target", AttributeResNet(["Bangs"], 6), 32, 1, {}), other)
    named = [*select[:4], "other", *select[5:]]  # --attributes Bangs Male --name other
    with pytest.raises(KamalError, match="the target net has no head for Male"):
        evaluate.main(evaluate.get_args_parser().parse_args(named))


def test_evaluate_counts_only_the_teachers_that_taught_a_component(custom, tmp_path, caplog):
    """A teacher added to the pool after training is not one of the component's teachers:
    not in its row, its best teacher or the cost (it is said)."""
    root, select = custom
    late = root / "snapshot/sources/zz_late/epoch_001.pth"
    save_source(late, ["Bangs"])
    try:
        with caplog.at_level("WARNING", logger="kamal_attr"):
            evaluate.main(evaluate.get_args_parser().parse_args(
                select + ["--json", str(tmp_path / "e.json")]))
    finally:
        late.unlink()
        late.parent.rmdir()
    result = json.loads((tmp_path / "e.json").read_text())
    assert list(result["attributes"]["Bangs"]["sources"]) == ["1", "2"]
    assert result["cost"]["num_teachers"] == 2
    assert "not counted, as they did not teach it: zz_late" in caplog.text


def test_list_pool_and_the_uncovered_attribute_error(custom, tmp_path):
    root, select = custom
    listing = subprocess.run([sys.executable, "train_sourcenet.py", "--list_pool", "--save_root",
                              str(root)], cwd=REPO, capture_output=True,
                             text=True)
    assert listing.returncode == 0, listing.stderr
    assert "teacher pool: 2 source nets under" in listing.stdout
    assert "custom/r34" in listing.stdout and "resnet34" in listing.stdout
    assert "coverage: Bangs 2, Male 1" in listing.stdout
    before = sorted(p for p in root.rglob("*"))
    result = subprocess.run([sys.executable, "train.py", "--attributes", "Male", "Eyeglasses",
                             *select[3:]], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no teacher in the pool covers Eyeglasses" in result.stderr
    assert sorted(p for p in root.rglob("*")) == before, "an uncovered attribute wrote files"


def test_predict_writes_one_csv_row_per_image(custom, synthetic_root, tmp_path):
    from kamal_attr import predict
    root, _ = custom
    target = root / "snapshot/target/mine/entropy/epoch_001.pth"
    images = sorted((synthetic_root / "img_align_celeba").glob("*.jpg"))[:3]
    out = tmp_path / "p.csv"
    predict.main(predict.get_args_parser().parse_args(
        ["--checkpoint", str(target), str(images[0]), str(synthetic_root / "img_align_celeba"),
         "--out", str(out), "--device", "cpu", "--workers", "0", "--batch_size", "4"]))
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image", "Bangs", "Male"]
    assert len(rows) == 1 + 1 + len(list((synthetic_root / "img_align_celeba").glob("*.jpg")))
    assert rows[1][0] == str(images[0]) and all(0 <= float(p) <= 1 for r in rows[1:] for p in r[1:])
    first = rows[1][1:]
    assert rows[2][1:] == first  # the same image in the folder gets the same probabilities
    with pytest.raises(KamalError, match="exists; it is never overwritten"):
        predict.main(predict.get_args_parser().parse_args(
            ["--checkpoint", str(target), str(images[0]), "--out", str(out)]))
    one = tmp_path / "one.csv"  # eval mode: one image a batch is fine
    theirs = tmp_path / f"one.csv.partial-{os.getpid()}"  # how an earlier version named its
    theirs.write_text("a file of the user's")  # temporary file: a name it could overwrite
    predict.main(predict.get_args_parser().parse_args(
        ["--checkpoint", str(target), str(images[0]), "--out", str(one), "--device", "cpu",
         "--workers", "0", "--batch_size", "1"]))
    assert [float(p) for p in list(csv.reader(one.open()))[1][1:]] == pytest.approx(
        [float(p) for p in first], abs=2e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", theirs.name, "p.csv"]
    assert theirs.read_text() == "a file of the user's"
