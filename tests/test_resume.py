"""Long runs: a killed or interrupted run resumes bitwise, and finished nets are reused only
when their recipe (fingerprint) matches; stale ones stop the run with what differs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
import train_sourcenet
from kamal_attr import KamalError
from kamal_attr.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
EPOCHS = ["--sorce_saveEpoch", "3", "--component_saveEpoch", "3", "--target_epoch", "3"]


def common(root: Path, data: Path) -> list[str]:
    return ["--data_root", str(data), "--save_root", str(root), "--image_size", "32",
            "--batch_size", "6", "--workers", "0", "--device", "cpu"]


#: A cosine schedule, whose learning rate changes every epoch: a resume that did not restore
#: the scheduler would train its later epochs at another rate (the step schedule's first
#: change comes after epoch 5).
SCHEDULE = ["--schedule", "cosine"]


def sources_args(root, data):
    return (["--all", "--group", "face", "--epochs", "3", "--width", "4", "--pretrained", "none"]
            + SCHEDULE + common(root, data))


def amalgamation_args(root, data):
    return (["--target_attribute", "face", "--width", "4", "--target_width", "6"] + EPOCHS
            + SCHEDULE + common(root, data))


def script(*argv: str, interrupt: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """Run a script in a fresh interpreter (optionally interrupted, see tests/interrupt.py)."""
    prefix = [str(REPO / "tests" / "interrupt.py"), interrupt[0], str(interrupt[1])] if interrupt else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *prefix, *argv], cwd=REPO, capture_output=True,
                          text=True, env=env)


def final_files(root: Path) -> list[Path]:
    """Every net's final epoch file under ``root`` (relative paths)."""
    snap = root / "snapshot"
    return sorted(p.relative_to(root) for p in snap.rglob("epoch_003.pth"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("uninterrupted")
    for argv in (["train_sourcenet.py", *sources_args(root, synthetic_root)],
                 ["train.py", *amalgamation_args(root, synthetic_root)]):
        done = script(*argv)
        assert done.returncode == 0, done.stderr[-2000:]
    return root


def test_killed_and_interrupted_runs_resume_bitwise_in_every_stage(uninterrupted, tmp_path, synthetic_root):
    root = tmp_path
    sources = ["train_sourcenet.py", *sources_args(root, synthetic_root)]
    amalgamate = ["train.py", *amalgamation_args(root, synthetic_root)]
    # source nets: SIGKILL right after source 2's first epoch was saved (the 4th last.pth)
    assert script(*sources, interrupt=("kill", 4)).returncode == -9
    done = script(*sources)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "face/source2_Oval_Face: resumed from" in done.stderr and "after epoch 1 of 3" in done.stderr
    # stage 1: Ctrl-C in the middle of the second component's second epoch (5 steps an epoch)
    stopped = script(*amalgamate, interrupt=("ctrl-c", 3 * 5 + 5 + 3))
    assert stopped.returncode == 130 and "interrupted" in stopped.stderr, stopped.stderr[-3000:]
    # stage 2: SIGKILL after the target's first epoch (3 components x 2 more epochs before it)
    assert script(*amalgamate, interrupt=("kill", 2 + 3 + 1)).returncode == -9
    log = (root / "run/log.txt").read_text()
    assert "component face/Young: resumed from" in log and "after epoch 1 of 3" in log
    done = script(*amalgamate)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "target face: resumed from" in done.stderr and "after epoch 1 of 3" in done.stderr

    files = final_files(uninterrupted)
    assert len(files) == 6 + 3 + 1 and files == final_files(root)
    for rel in files:
        ours, reference = load_checkpoint(root / rel), load_checkpoint(uninterrupted / rel)
        assert ours["digest"] == reference["digest"], f"{rel} differs from the uninterrupted run"
        assert all(torch.equal(ours["model"][k], v) for k, v in reference["model"].items())
    assert not list(root.rglob("*.tmp"))


def test_a_finished_net_of_another_recipe_is_refused_with_what_differs(uninterrupted, synthetic_root, tmp_path):
    args = train.get_args_parser().parse_args(
        ["--target_attribute", "face", "--width", "8", "--target_width", "6"] + EPOCHS
        + SCHEDULE + common(uninterrupted, synthetic_root))
    with pytest.raises(KamalError, match=r"component face/Oval_Face: .*width: 4 -> 8.*--overwrite"):
        train.main(args)


def test_a_retrained_teacher_makes_its_component_stale(uninterrupted, synthetic_root, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(uninterrupted / "snapshot", root / "snapshot")
    retrain = train_sourcenet.get_args_parser().parse_args(
        ["--target_attribute", "Young", "--source_id", "3", "--epochs", "3", "--width", "4",
         "--pretrained", "none", "--seed", "7", "--overwrite"] + common(root, synthetic_root))
    train_sourcenet.main(retrain)
    args = train.get_args_parser().parse_args(amalgamation_args(root, synthetic_root))
    with pytest.raises(KamalError, match=r"component face/Young: .*teachers.source3_Young: \w+ -> \w+"):
        train.main(args)
    # the target stage alone does not reuse (or train from) that component either
    args = train.get_args_parser().parse_args(amalgamation_args(root, synthetic_root)
                                              + ["--stage", "target"])
    with pytest.raises(KamalError, match=r"component face/Young: .* learnt from other teacher weights "
                       r"than this run names \(teachers.source3_Young: \w+ -> \w+: retrained since, "
                       r"or another --sorce_saveEpoch\); retrain it with: python train.py "
                       r"--target_attribute face --stage component --overwrite"):
        train.main(args)


def test_overwrite_starts_over_and_leaves_no_old_epochs(uninterrupted, synthetic_root, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(uninterrupted / "snapshot", root / "snapshot")
    folder = root / "snapshot/sources/face/source1_Oval_Face"
    (folder / "epoch_003.pth.k1ll3d_x.kamal_attr.tmp").write_bytes(b"half a write")  # a killed write
    retrain = ["--target_attribute", "Oval_Face", "--source_id", "1", "--epochs", "3", "--width",
               "4", "--pretrained", "none", "--seed", "7", "--overwrite"] + common(root, synthetic_root)
    killed = script("train_sourcenet.py", *retrain, interrupt=("kill", 1))
    assert killed.returncode == -9
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_001.pth", "last.pth"]
    assert load_checkpoint(folder / "last.pth")["recipe"]["seed"] == 7 + 1000


def test_a_resume_under_other_conditions_is_said(uninterrupted, synthetic_root, tmp_path, caplog):
    """Precision, image source and process count are not in the recipe (they change how,
    not what, a net learns), but a resume under others is logged: it is not bitwise."""
    import shutil
    from kamal_attr.checkpoint import atomic_save
    root = tmp_path / "copy"
    shutil.copytree(uninterrupted / "snapshot", root / "snapshot")
    last_path = root / "snapshot/sources/face/source1_Oval_Face/last.pth"
    last = load_checkpoint(last_path)
    assert last["conditions"] == {"precision": "fp32", "images": "jpeg", "processes": 1}
    atomic_save({**last, "epoch": 2, "conditions": {**last["conditions"], "precision": "bf16"}},
                last_path)  # as if epochs 1-2 had run on a GPU in bf16
    args = ["--target_attribute", "Oval_Face", "--source_id", "1", "--epochs", "3", "--width",
            "4", "--pretrained", "none"] + SCHEDULE + common(root, synthetic_root)
    with caplog.at_level("WARNING", logger="kamal_attr"):
        train_sourcenet.main(train_sourcenet.get_args_parser().parse_args(args))
    assert "epochs 1-2 ran under other conditions (precision: bf16 -> fp32)" in caplog.text


def test_a_net_trained_again_hides_its_old_tensorboard_events_without_removing_them(
        uninterrupted, synthetic_root, tmp_path):
    """Event files are never removed (they may be the only record of a run); the new run's
    purge marker makes TensorBoard show only its own points."""
    import shutil
    root = tmp_path / "copy"
    for folder in ("snapshot", "run"):
        shutil.copytree(uninterrupted / folder, root / folder)
    logs = root / "run/sources/face/source1_Oval_Face"
    old = set(logs.glob("events.out.tfevents.*"))
    retrain = ["--target_attribute", "Oval_Face", "--source_id", "1", "--epochs", "1", "--width",
               "4", "--pretrained", "none", "--overwrite"] + common(root, synthetic_root)
    train_sourcenet.main(train_sourcenet.get_args_parser().parse_args(retrain))
    assert old and old < set(logs.glob("events.out.tfevents.*"))
    assert shown_steps(logs, "lr") == [1]


def shown_steps(folder: Path, tag: str) -> list[int]:
    """The steps of ``tag`` that TensorBoard's Python loader (``--load_fast=false``) shows."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    shown = EventAccumulator(str(folder))
    shown.Reload()
    return [event.step for event in shown.Tensors(tag)]


@pytest.mark.parametrize("start_epoch, steps", [(1, [1]), (3, [1, 2, 3])])
def test_tensorboard_hides_the_old_events_of_a_folder_an_earlier_version_wrote(
        tmp_path, start_epoch, steps):
    from types import SimpleNamespace
    from torch.utils.tensorboard import SummaryWriter
    from kamal_attr.runtime import open_writer
    with SummaryWriter(str(tmp_path)) as old:  # a fresh start of an earlier version: no marker
        for epoch in (1, 2, 3, 4):
            old.add_scalar("lr", 0.5, epoch)
    old_file, = tmp_path.iterdir()
    old_file.rename(tmp_path / "events.out.tfevents.1000000000.earlier.1.0")  # written before
    writer = open_writer(tmp_path, SimpleNamespace(args={}), {}, start_epoch)
    writer.add_scalar("lr", 0.1, start_epoch)
    writer.close()
    assert shown_steps(tmp_path, "lr") == steps  # the old epochs from start_epoch on hidden
