"""End to end on a few dozen tiny drawn faces: scripts' mains in-process, CPU, 32 px."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train
import train_sourcenet
import kamal_attr.stages as stages
from kamal_attr import KamalError
from kamal_attr.engine import fit
from kamal_attr.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


def common(root: Path, data: Path) -> list[str]:
    return ["--data_root", str(data), "--save_root", str(root), "--image_size", "32",
            "--batch_size", "6", "--workers", "0", "--device", "cpu"]


def events(folder: Path) -> list[Path]:
    return list(folder.rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """Train the hair group's 9 source nets, both stages and evaluate (1 epoch each)."""
    root = tmp_path_factory.mktemp("run")
    args = common(root, synthetic_root)
    select = ["--target_attribute", "hair", "--sorce_saveEpoch", "1", "--component_saveEpoch", "1",
              "--target_epoch", "1"] + args  # which nets: shared by train.py and evaluate.py
    with pytest.MonkeyPatch.context() as patch:  # record the training loader of every net
        patch.setattr(stages, "fit", lambda method, loader, *a, **k: (
            FITTED.append((k["name"], loader)), fit(method, loader, *a, **k))[1])
        train_sourcenet.main(train_sourcenet.get_args_parser().parse_args(
            ["--all", "--group", "hair", "--epochs", "1", "--width", "4", "--pretrained", "none"] + args))
        train.main(train.get_args_parser().parse_args(select + ["--width", "4", "--target_width", "6"]))
    return root, select


#: (net name, training DataLoader) of every net the ``trained`` fixture trained, in order.
FITTED: list = []


def test_every_net_of_every_stage_is_trained_on_shuffled_batches(trained):
    from kamal_attr.runtime import EpochShuffle
    names = [name for name, _ in FITTED]
    assert names == [f"hair/source{k}_{a}" for k, a in [(1, "Black_Hair"), (2, "Black_Hair"),
                     (3, "Blond_Hair"), (4, "Blond_Hair"), (5, "Brown_Hair"), (6, "Brown_Hair"),
                     (7, "Brown_Hair"), (8, "Bangs"), (9, "Bangs")]] + [
        f"component hair/{a}" for a in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Bangs")] + [
        "target hair"], f"nets trained: {names} (every component, then the target)"
    for name, loader in FITTED:
        assert isinstance(loader.sampler, EpochShuffle) and loader.sampler.shuffle, f"{name}: not shuffled"
        order = list(loader.sampler)
        assert sorted(order) == list(range(len(loader.dataset))) and order != sorted(order), \
            f"{name}: the training data is not shuffled"
        assert loader.dataset.train, f"{name}: trained on the un-augmented view"


def test_each_stage_loads_the_files_the_previous_stage_saved(trained):
    root, _ = trained
    saved = lambda pattern: sorted(str(p) for p in root.glob(pattern))  # noqa: E731
    target = load_checkpoint(root / "snapshot/target/hair/entropy/epoch_001.pth")
    assert sorted(target["components"]) == saved("snapshot/components/hair/entropy/*/epoch_001.pth")
    sources = [s for a in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Bangs") for s in load_checkpoint(
        root / f"snapshot/components/hair/entropy/{a}/epoch_001.pth")["sources"]]
    assert sorted(sources) == saved("snapshot/sources/hair/*/epoch_001.pth")


def test_source_net_checkpoint_and_tensorboard(trained):
    root, _ = trained
    ckpt = load_checkpoint(root / "snapshot/sources/hair/source7_Brown_Hair/epoch_001.pth")
    assert ckpt["kind"] == "source" and ckpt["attributes"] == ["Brown_Hair", "Narrow_Eyes", "Chubby"]
    assert ckpt["width"] == 4 and ckpt["image_size"] == 32 and ckpt["epoch"] == 1
    assert set(ckpt["val_accuracy"]) == set(ckpt["attributes"])
    last = load_checkpoint(root / "snapshot/sources/hair/source7_Brown_Hair/last.pth")
    assert {"optimizer", "scheduler", "method"} <= set(last)
    assert len(events(root / "run/sources/hair/source7_Brown_Hair")) == 1
    assert "source7_Brown_Hair epoch 1/1" in (root / "run/log.txt").read_text()


def test_routing_lists_partition_the_training_split(trained, synthetic_root):
    root, _ = trained
    folder = root / "data/sources/hair/entropy"
    names = [n for f in ("source5_Brown_Hair", "source6_Brown_Hair", "source7_Brown_Hair")
             for n in (folder / f"{f}.txt").read_text().split()]
    assert sorted(names) == [f"{i:06d}.jpg" for i in range(1, 33)]  # the 32 training images, once


def test_components_target_and_tensorboard(trained):
    root, _ = trained
    for attribute in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Bangs"):
        ckpt = load_checkpoint(root / f"snapshot/components/hair/entropy/{attribute}/epoch_001.pth")
        assert ckpt["kind"] == "component" and ckpt["attributes"] == [attribute]
        assert abs(sum(ckpt["routing_share"]) - 1) < 1e-6
    target = load_checkpoint(root / "snapshot/target/hair/entropy/epoch_001.pth")
    assert target["attributes"] == ["Black_Hair", "Blond_Hair", "Brown_Hair", "Bangs"]
    assert target["width"] == 6
    assert events(root / "run/components/hair/entropy/Bangs") and events(root / "run/target/hair/entropy")


def test_evaluate_writes_json(trained, tmp_path):
    root, amalgamate = trained
    out = tmp_path / "hair.json"
    evaluate.main(evaluate.get_args_parser().parse_args(amalgamate + ["--json", str(out)]))
    result = json.loads(out.read_text())
    assert result["group"] == "hair" and result["split"] == "test"
    row = result["attributes"]["Brown_Hair"]
    assert set(row["sources"]) == {"5", "6", "7"}
    for key in ("best_source", "min_entropy", "component", "target"):
        assert 0 <= row[key] <= 1 and 0 <= result["mean"][key] <= 1
    assert row["best_source"] == max(row["sources"].values())
    assert result["entropy"]["num_correct"] + result["entropy"]["num_wrong"] == 9 * 17
    claim = result["claims"]["2_component_vs_best_source"]
    assert claim["of"] == 4 and claim["gaps"]["Brown_Hair"] == row["component"] - row["best_source"]
    # a rerun replaces its own earlier result; any other file there is refused, untouched
    evaluate.main(evaluate.get_args_parser().parse_args(amalgamate + ["--json", str(out)]))
    assert json.loads(out.read_text()) == result
    theirs = tmp_path / "notes.json"
    theirs.write_text('{"my": "notes"}')
    with pytest.raises(KamalError, match="notes.json exists and is not an evaluation result of this "
                       "project; it is never overwritten: pass another --json"):
        evaluate.main(evaluate.get_args_parser().parse_args(amalgamate + ["--json", str(theirs)]))
    assert theirs.read_text() == '{"my": "notes"}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "hair.json", "notes.json"]


def test_evaluate_by_style_splits_sources_and_routing(trained, tmp_path, synthetic_root):
    from kamal_attr.synthetic import STYLES, STYLE_LIST
    root, amalgamate = trained
    out = tmp_path / "hair.json"
    evaluate.main(evaluate.get_args_parser().parse_args(amalgamate + ["--json", str(out), "--by_style"]))
    table = json.loads(out.read_text())["attributes"]["Brown_Hair"]["by_style"]
    assert set(table) <= set(STYLES)
    for style in table.values():
        assert set(style["sources"]) == {"5", "6", "7"}
        assert abs(sum(style["routed"].values()) - 1) < 1e-6 and 0 <= style["min_entropy"] <= 1
    without = tmp_path / "without_styles"  # the same dataset, less its style list
    without.mkdir()
    for f in synthetic_root.iterdir():
        if f.name != STYLE_LIST:
            (without / f.name).symlink_to(f)
    args = [str(without) if a == str(synthetic_root) else a for a in amalgamate]
    with pytest.raises(KamalError, match=STYLE_LIST):
        evaluate.main(evaluate.get_args_parser().parse_args(args + ["--by_style"]))


def test_claims_count_attributes_against_their_thresholds():
    from kamal_attr.evaluation import check_claims, format_claims
    row = lambda best, comp, target: {"best_source": best, "component": comp, "target": target}  # noqa: E731
    result = {"attributes": {"A": row(0.90, 0.91, 0.905), "B": row(0.80, 0.79, 0.775)},
              "entropy": {"correct": 0.2, "wrong": 0.4}}
    claims = check_claims(result)
    assert claims["1_entropy_lower_when_correct"]["holds"]
    assert claims["2_component_vs_best_source"]["holds"] == 1  # B: -1 point
    assert claims["3_target_vs_best_source"]["holds"] == 1
    assert claims["3_target_vs_component"]["holds"] == 1  # A: -0.5 holds, B: -1.5 does not
    assert "2 component >= best source net: 1/2 attributes (A +1.00, B -1.00)" in format_claims(claims)
    result["attributes"]["B"]["target"] = None
    assert check_claims(result)["3_target_vs_component"] is None


def test_second_run_reuses_finished_nets(trained, caplog):
    root, amalgamate = trained
    before = (root / "snapshot/target/hair/entropy/epoch_001.pth").stat().st_mtime_ns
    train.main(train.get_args_parser().parse_args(amalgamate + ["--width", "4", "--target_width", "6"]))
    assert (root / "snapshot/target/hair/entropy/epoch_001.pth").stat().st_mtime_ns == before


def test_reusing_a_source_net_trained_on_another_part_is_refused(trained, synthetic_root):
    root, _ = trained
    path = root / "snapshot/sources/hair/source1_Black_Hair/epoch_001.pth"
    before = path.read_bytes()
    args = ["--target_attribute", "Black_Hair", "--source_id", "1", "--epochs", "1", "--width", "4",
            "--pretrained", "none", "--train_part", "1/2"] + common(root, synthetic_root)
    with pytest.raises(KamalError, match=r"train_part: None -> \[1, 2\]"):
        train_sourcenet.main(train_sourcenet.get_args_parser().parse_args(args))
    assert path.read_bytes() == before


def test_missing_source_names_file_and_command(tmp_path, synthetic_root):
    args = train.get_args_parser().parse_args(
        ["--target_attribute", "eye", "--stage", "component", "--sorce_saveEpoch", "3"]
        + common(tmp_path, synthetic_root))
    with pytest.raises(KamalError) as info:
        train.main(args)
    assert not (tmp_path / "run").exists()  # stopped before anything was written
    message = str(info.value)
    assert "source1_Bags_Under_Eyes/epoch_003.pth" in message
    assert "python train_sourcenet.py --target_attribute Bags_Under_Eyes --source_id 1 --epochs 3" in message


def test_routing_is_deterministic(trained, synthetic_root):
    from kamal_attr.attributes import source_nets_of
    from kamal_attr.config import resolve_config
    from kamal_attr.routing import compute_routing
    from kamal_attr.runtime import dataset
    from kamal_attr.pool import preset_task
    from kamal_attr.stages import load_teachers
    root, amalgamate = trained
    cfg = resolve_config(train.get_args_parser().parse_args(amalgamate))
    task = preset_task("hair", cfg.source_save_epoch, cfg.sources_root)
    teachers = load_teachers(task, "Brown_Hair", cfg)
    data = dataset(cfg, "train", ["Brown_Hair"])
    first, second = (compute_routing(teachers.nets, "Brown_Hair", data, cfg, teachers.inputs)
                     for _ in range(2))
    assert torch.equal(first[1], second[1]) and first[1].sum(1).eq(1).all()
    assert len(source_nets_of("hair", "Brown_Hair")) == first[0].shape[1]


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path):
    result = subprocess.run([sys.executable, "train_sourcenet.py", "--data_root", str(tmp_path / "none"),
                             "--save_root", str(tmp_path), "--device", "cpu", "--pretrained", "none"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: data root") and len(result.stderr.strip().splitlines()) == 1


def test_evaluate_any_checkpoint(trained, tmp_path, capsys):
    root, select = trained
    out = tmp_path / "one.json"
    path = root / "snapshot/sources/hair/source3_Blond_Hair/epoch_001.pth"
    evaluate.main(evaluate.get_args_parser().parse_args(
        select[8:] + ["--checkpoint", str(path), "--json", str(out)]))  # no task flags
    result = json.loads(out.read_text())["accuracy"]
    assert list(result) == ["Blond_Hair", "Pale_Skin", "Receding_Hairline"]
    assert all(0.5 <= r["majority"] <= 1 and 0 <= r["accuracy"] <= 1 for r in result.values())
    assert "Receding_Hairline" in capsys.readouterr().out


def test_demo_source_nets_of_an_attribute_split_the_training_split():
    from kamal_attr.attributes import SourceNetSpec, source_net
    from kamal_attr.config import resolve_config
    from kamal_attr.stages import source_part
    parser = train_sourcenet.get_args_parser()
    demo = resolve_config(parser.parse_args(["--demo", "--device", "cpu"]))
    assert [source_part(demo, source_net("Black_Hair", k), None) for k in (1, 2)] == [(1, 2), (2, 2)]
    assert [source_part(demo, source_net("Brown_Hair", k), None) for k in (5, 6, 7)] == [(1, 3), (2, 3), (3, 3)]
    assert source_part(demo, source_net("Brown_Hair", 7), (1, 1)) == (1, 1)  # --train_part wins
    assert source_part(demo, SourceNetSpec("custom", 0, ("Male",), label="m"), None) is None
    real = resolve_config(parser.parse_args(["--device", "cpu"]))
    assert source_part(real, source_net("Black_Hair", 1), None) is None  # real data: the whole split


def test_an_epoch_that_was_not_saved_lists_those_that_were(trained):
    root, select = trained
    def with_value(flag, value):
        return [value if prev == flag else a for prev, a in zip([None] + select, select)]
    with pytest.raises(KamalError, match=r"epoch_002.pth does not exist; .*Black_Hair has epochs 1: "
                                         r"pass one with --component_saveEpoch"):
        evaluate.main(evaluate.get_args_parser().parse_args(with_value("--component_saveEpoch", "2")))
    with pytest.raises(KamalError, match=r"source1_Black_Hair/epoch_002.pth\n    \S+source1_Black_Hair "
                                         r"has epochs 1: pass one with --sorce_saveEpoch"):
        train.main(train.get_args_parser().parse_args(with_value("--sorce_saveEpoch", "2")
                                                      + ["--stage", "component"]))


@pytest.mark.parametrize("name, current", [("cuda", []), ("cuda:1", [torch.device("cuda:1")]),
                                           ("cpu", [])])
def test_configure_device_makes_a_named_gpu_current_and_float32_exact(monkeypatch, name, current):
    """``--device cuda:1`` becomes the current GPU (synchronisation and pinned memory use
    it); plain ``cuda`` is the current one already (``set_device`` refuses a device without
    an index); on a GPU cuDNN picks kernels by timing and TF32 is off. (No GPU needed: the
    calls are recorded.)"""
    from kamal_attr.runtime import configure_device
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    configure_device(torch.device(name))
    assert made_current == current
    gpu = name != "cpu"
    assert torch.backends.cudnn.benchmark is gpu and torch.backends.cudnn.allow_tf32 is not gpu
