"""User data is never touched, and bad flags or inputs stop with one line, writing nothing."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate
import train
import train_sourcenet
from kamal_attr import KamalError
from kamal_attr.cli import run
from kamal_attr.config import resolve_config
from kamal_attr.runtime import ensure_data
from kamal_attr.synthetic import MARKER, generate, is_ours

from conftest import write_celeba

REPO = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def demo_cfg(data_root: Path, save_root: Path):
    args = train.get_args_parser().parse_args(
        ["--demo", "--data_root", str(data_root), "--save_root", str(save_root), "--device", "cpu"])
    return resolve_config(args)


LAYOUTS = {
    "official": dict(kind="official"),
    "anno-eval": dict(kind="official", lists_dir="split", image_dir="Img/img_align_celeba"),
    "torchvision": dict(kind="official", lists_dir="celeba", image_dir="celeba/img_align_celeba"),
    "kaggle": dict(kind="kaggle", image_dir="img_align_celeba/img_align_celeba"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_demo_pointed_at_celeba_in_any_layout_reads_it_and_writes_nothing_there(tmp_path, layout):
    data = tmp_path / "CelebA"
    write_celeba(data, n=6, **LAYOUTS[layout])
    before = snapshot(data)
    ensure_data(demo_cfg(data, tmp_path / "out"))
    assert snapshot(data) == before


@pytest.mark.parametrize("contents", ["other dataset", "partial celeba"])
def test_demo_refuses_a_folder_of_someone_elses_files(tmp_path, contents):
    data = tmp_path / "datasets"
    if contents == "other dataset":
        (data / "imagenet").mkdir(parents=True)
        (data / "imagenet" / "n01440764.tar").write_bytes(b"precious")
    else:  # lists present, images not yet unpacked: not CelebA to the reader, not ours either
        write_celeba(data, n=6)
        for image in (data / "img_align_celeba").iterdir():
            image.unlink()
    before = snapshot(data)
    with pytest.raises(KamalError, match=f"--data_root {data} holds no CelebA"):
        ensure_data(demo_cfg(data, tmp_path / "out"))
    assert snapshot(data) == before


def test_demo_script_refuses_before_writing_anything(tmp_path):
    data = tmp_path / "mine"
    data.mkdir()
    (data / "notes.txt").write_text("my only copy")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "train.py", "--demo", "--data_root", str(data),
                             "--save_root", str(out), "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: --data_root {data} holds no CelebA")
    assert (data / "notes.txt").read_text() == "my only copy" and not out.exists()


def test_generator_writes_only_into_new_empty_or_its_own_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    generate(empty, num_images=9, workers=1)
    assert is_ours(empty) and (empty / "list_attr_celeba.txt").exists()
    first = snapshot(empty)
    generate(empty, num_images=9, seed=1, workers=1)  # ours: replaced
    assert snapshot(empty) != first and is_ours(empty)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    with pytest.raises(KamalError, match=f"{foreign} holds files that the synthetic-data generator did not write"):
        generate(foreign, num_images=9, workers=1)
    assert snapshot(foreign) == {"a.jpg": hashlib.sha256(b"x").hexdigest()}
    result = subprocess.run([sys.executable, "-m", "kamal_attr.synthetic", "--out", str(foreign),
                             "--num_images", "9"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and (foreign / "a.jpg").exists()


def test_leftovers_of_a_killed_generator_are_removed_and_foreign_lookalikes_kept(tmp_path):
    ours = tmp_path / ".synthetic.partial-abc"
    ours.mkdir()
    (ours / MARKER).write_text("{}")
    theirs = tmp_path / ".synthetic.partial-xyz"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("not ours")
    drawing = tmp_path / ".synthetic.partial-now"  # another generator, still running, draws here
    drawing.mkdir()
    (drawing / MARKER).write_text(json.dumps({"pid": os.getpid()}))
    generate(tmp_path / "synthetic", num_images=9, workers=1)
    assert not ours.exists() and (theirs / "keep.txt").exists() and drawing.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".synthetic.partial-now", ".synthetic.partial-xyz", "synthetic"]


def test_ctrl_c_while_drawing_removes_the_unfinished_dataset_and_says_so(tmp_path):
    """Ctrl-C (a real SIGINT to the whole process group, as a terminal sends it) once the
    drawing processes are at work: exit 130, one line saying what happened, no traceback of
    any process, and no folder left behind."""
    out = tmp_path / "synthetic"
    child = subprocess.Popen(
        [sys.executable, "-c", "import runpy, signal; signal.signal(signal.SIGINT, "
         "signal.default_int_handler); runpy.run_module('kamal_attr.synthetic', "
         "run_name='__main__', alter_sys=True)", "--out", str(out), "--num_images", "4000",
         "--workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    images = None
    for _ in range(600):  # up to a minute for the first drawn faces to appear
        images = next(tmp_path.glob(".synthetic.partial-*/img_align_celeba"), None)
        if images is not None and any(images.iterdir()):
            break
        time.sleep(0.1)
    assert images is not None, "the generator never started drawing"
    os.killpg(child.pid, signal.SIGINT)
    err = child.communicate(timeout=60)[1]
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "interrupted; the unfinished dataset was removed: rerun the same command to draw it")
    assert "Traceback" not in err and "ForkPoolWorker" not in err, err
    assert not list(tmp_path.iterdir())


def call(script, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's command line in this process as ``python script ...`` would."""
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: script.main(script.get_args_parser().parse_args(argv)))
        sys.exit(0)
    return exit_info.value.code, capsys.readouterr().err


BAD = [
    (train, ["--lr", "-1"], "argument --lr: must be a finite number in (0, 1], got -1"),
    (train, ["--lr", "nan"], "argument --lr: must be a finite number in (0, 1], got nan"),
    (train, ["--lr", "0"], "argument --lr: must be a finite number in (0, 1], got 0"),
    (train_sourcenet, ["--lr", "inf"], "argument --lr: must be a finite number"),
    (train, ["--image_size", "1"], "argument --image_size: must be >= 32"),
    (train, ["--width", "1"], "argument --width: must be >= 2"),
    (train, ["--batch_size", "1"], "argument --batch_size: must be >= 2"),
    (train, ["--target_epoch", "0"], "argument --target_epoch: must be >= 1"),
    (train_sourcenet, ["--epochs", "-3"], "argument --epochs: must be >= 1"),
    (train_sourcenet, ["--workers", "-1"], "argument --workers: must be >= 0"),
    (train_sourcenet, ["--seed", "-5"], "argument --seed: must be in"),
    (evaluate, ["--sorce_saveEpoch", "x"], "argument --sorce_saveEpoch/--source_save_epoch: expected a whole number"),
    (train, ["--device", "cuda:7"], "--device cuda:7: "),
    (train, ["--device", "tpu"], "--device 'tpu' is not a torch device"),
    (train, ["--target_attribute", "nose"], "unknown group 'nose'"),
    (evaluate, ["--target_attribute", "Eye"], "unknown group 'Eye'. Did you mean 'eye'?"),
    (train_sourcenet, ["--target_attribute", "Blak_Hair"], "Did you mean 'Black_Hair'?"),
    (train_sourcenet, ["--target_attribute", "Black_Hair", "--source_id", "9"], "its source ids are [1, 2]"),
    (train_sourcenet, ["--attributes", "Male", "Beard"], "unknown attribute 'Beard'"),
    (train_sourcenet, ["--train_part", "4/3"], "--train_part 4/3: need 1 <= k <= P"),
    (train_sourcenet, ["--optimizer", "lbfgs"], "argument --optimizer: invalid choice"),
    # flags of one way of naming nets mixed with another's: refused, not silently ignored
    (train_sourcenet, ["--all", "--attributes", "Male"],
     "--attributes trains one net on the attributes it names: drop --all"),
    (train_sourcenet, ["--attributes", "Male", "--source_id", "2"], "drop --source_id"),
    (train_sourcenet, ["--group", "hair"], "--group hair picks the nets of --all: add --all"),
    (train_sourcenet, ["--name", "mine"], "--name mine names an --attributes net"),
    (train_sourcenet, ["--all", "--target_attribute", "Bangs"],
     "--all trains every source net (of --group): drop --target_attribute"),
    (train, ["--attributes", "Black_Hair", "--target_attribute", "eye"],
     "--target_attribute eye and --attributes Black_Hair name two different tasks"),
    (evaluate, ["--target_attribute", "hair", "--attributes", "Male"], "name two different tasks"),
    # flags that a mode would ignore
    (evaluate, ["--checkpoint", "c.pth", "--attributes", "Male", "--selection", "random"],
     "--checkpoint evaluates that one file, so --attributes, --selection would be ignored"),
    (train_sourcenet, ["--list_pool", "--all"],
     "--list_pool lists the pool and trains nothing, so --all would be ignored: drop it"),
]


@pytest.mark.parametrize("script, flags, message", BAD, ids=[" ".join(f) for _, f, _ in BAD])
def test_bad_flags_stop_with_one_line_and_write_nothing(tmp_path, capsys, script, flags, message):
    argv = ["--save_root", str(tmp_path / "out"), "--data_root", str(tmp_path / "data")]
    argv += ["--pretrained", "none"] if script is train_sourcenet else []
    code, err = call(script, argv + flags, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_unreadable_imagenet_weights_stop_in_one_line_before_any_data_is_made(tmp_path, capsys):
    weights = tmp_path / "notes.pth"
    weights.write_text("{not: torch}")
    code, err = call(train_sourcenet, ["--demo", "--width", "64", "--pretrained", str(weights),
                                       "--save_root", str(tmp_path / "out"), "--data_root",
                                       str(tmp_path / "data"), "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot load {weights} as a state dict" in err and "weights_only=False" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_demo_stops_before_the_data_when_its_result_file_is_someone_elses(tmp_path, capsys):
    theirs = tmp_path / "out/run/demo/evaluate_hair_entropy.json"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("my notes")
    code, err = call(train, ["--demo", "--save_root", str(tmp_path / "out"), "--data_root",
                             str(tmp_path / "data"), "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "evaluate_hair_entropy.json exists and is not an evaluation result of this project" in err
    assert theirs.read_text() == "my notes" and not (tmp_path / "data").exists()
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "demo", "evaluate_hair_entropy.json", "run"]


def test_an_output_path_that_cannot_be_written_is_one_line_before_the_work(tmp_path, capsys):
    from kamal_attr import predict
    notes = tmp_path / "notes"
    notes.write_text("a file, where the command would need a folder")
    out = ["--save_root", str(tmp_path / "out"), "--data_root", str(tmp_path / "data"), "--device", "cpu"]
    code, err = call(evaluate, ["--target_attribute", "hair", "--json", str(notes / "r.json")] + out,
                     capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--json {notes / 'r.json'} cannot be written: {notes} is a file, not a folder" in err
    code, err = call(predict, ["--checkpoint", str(tmp_path / "none.pth"), str(tmp_path),
                               "--out", str(notes / "p.csv")], capsys)
    assert code == 2 and "is a file, not a folder; pass another --out" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
    code, err = call(train_sourcenet, ["--demo", "--save_root", str(notes / "out")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {notes / 'out'}") and "Not a directory" in err
    assert notes.read_text() == "a file, where the command would need a folder"


def test_only_errors_of_writing_are_one_line_and_a_closed_pipe_ends_quietly(tmp_path, capsys):
    def fail(error):
        raise error
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: fail(OSError(28, "No space left on device", str(tmp_path / "x.pth"))))
    code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 1 and err == (f"error: {tmp_path / 'x.pth'}: No space left on device (check "
                                 "that path's permissions and free space, or choose another "
                                 "--save_root/--out)\n")
    with pytest.raises(FileNotFoundError):  # not the user's to fix: a bug, with its traceback
        run(lambda: fail(FileNotFoundError(2, "No such file or directory", "ours.tmp")))
    closed = subprocess.run(
        [sys.executable, "-c", "from kamal_attr.cli import run\n"
         "def main():\n    raise BrokenPipeError(32, 'Broken pipe')\nrun(main)"],
        cwd=REPO, capture_output=True, text=True)
    assert closed.returncode == 1 and closed.stderr == ""


def test_a_module_of_the_package_is_named_as_it_is_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kamal_attr.predict", "--batch_size", "0", "x"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.endswith("(see python -m kamal_attr.predict --help)\n"), done.stderr


def test_real_preset_without_imagenet_weights_is_an_error(tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    code, err = call(train_sourcenet, ["--save_root", str(tmp_path / "out"), "--weights_dir",
                                       str(weights), "--device", "cpu"], capsys)
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"no ImageNet resnet18 weights in {weights}: put torchvision's resnet18-f37072fd.pth " \
           "there, or pass --pretrained none" in err
