"""Checkpoint files: written atomically, read with one clear error when damaged, removed by
``--overwrite`` only when proven ours, and fingerprinted by what decides a net's weights."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import train_sourcenet
import kamal_attr.stages as stages
from kamal_attr import KamalError
from kamal_attr.checkpoint import (CheckpointError, atomic_save, clear_net, fingerprint,
                                   load_checkpoint, net_record, plan_training)
from kamal_attr.cli import run
from kamal_attr.models import AttributeResNet
from kamal_attr.pool import discover_pool


def save_net(path: Path, epoch: int = 1, recipe: dict | None = None) -> dict:
    record = net_record("source", AttributeResNet(["Male"], 4), 32, epoch, recipe or {"seed": 1})
    atomic_save(record, path)
    return record


def plan(folder: Path, overwrite: bool = False):
    return plan_training(folder, 2, {"seed": 1}, overwrite, "net", "this command")


@pytest.mark.parametrize("damage, reason", [
    (lambda data: b"", "the file is empty"),
    (lambda data: data[: len(data) // 2], ""),  # cut short: torch's own first line
    (lambda data: data[:100] + bytes(len(data) - 100), ""),  # zeroed after its first bytes
    (lambda data: bytes(len(data)), "torch cannot read it safely"),  # zeroed (a power loss)
    (lambda data: b"<html>404</html>", "torch cannot read it safely"),  # a failed download
], ids=["empty", "cut short", "zeroed tail", "zeroed", "web page"])
def test_a_damaged_checkpoint_is_one_error_line_naming_it(tmp_path, capsys, damage, reason):
    save_net(tmp_path / "epoch_001.pth")
    last = tmp_path / "last.pth"
    save_net(last)
    last.write_bytes(damage(last.read_bytes()))
    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {last} \\({reason}") as caught:
        plan(tmp_path)
    message = str(caught.value)
    assert "remove or replace it" in message and "\n" not in message
    assert "weights_only=False" not in message and "False" not in message, message
    with pytest.raises(SystemExit) as code:  # as a script shows it: one line, exit 2
        run(lambda: plan(tmp_path))
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.startswith("error: cannot load checkpoint") and err.count("\n") == 1
    # the pool's scan passes it over with the same reason instead of stopping
    pool = tmp_path / "pool"
    (pool / "net").mkdir(parents=True)
    shutil.copy(last, pool / "net.pth")
    entries, notes = discover_pool(pool, save_epoch=1)
    assert not entries and any(f"net.pth: passed over, cannot load checkpoint" in n for n in notes)


def test_a_file_that_would_run_code_is_refused_without_suggesting_to_run_it(tmp_path):
    path = tmp_path / "last.pth"
    torch.save({"format": "kamal_attr/1", "payload": Path("x")}, path)  # a pickled object
    with pytest.raises(CheckpointError, match=r"holds pickled objects \(pathlib.PosixPath\)") as caught:
        load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value)


def test_overwrite_removes_only_files_it_proves_are_its_own(tmp_path):
    save_net(tmp_path / "epoch_001.pth")
    save_net(tmp_path / "last.pth")
    save_net(tmp_path / "epoch_best.pth")  # a user's copy: a checkpoint, but not one of our names
    (tmp_path / "last.pth.x1y2z3_a.kamal_attr.tmp").write_bytes(b"half a write")  # killed writes
    torch.save({"a": torch.zeros(3)}, tmp_path / "epoch_001.pthab12cd_9.tmp")  # as named before
    (tmp_path / "last.pthzz99yy88.tmp").write_bytes(b"")  # killed before it wrote a byte
    users = {"model.pth.download.tmp": b"someone's download", "epoch_003.pth.tmp": b"theirs",
             "notes.txt": b"mine", "epoch_1.pth": b"not our name either",
             "last.pth_partial.tmp": b"an old name's shape, but not a torch archive of its name"}
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    clear_net(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["epoch_best.pth", *users])
    assert all((tmp_path / name).read_bytes() == data for name, data in users.items())


def test_an_unreadable_file_named_like_an_old_temporary_file_is_kept_not_a_crash(tmp_path, monkeypatch):
    import kamal_attr.checkpoint as checkpoint
    odd = tmp_path / "last.pthabcdefgh.tmp"
    odd.write_bytes(b"")

    def unreadable(*args, **kwargs):
        raise PermissionError("permission denied")
    monkeypatch.setattr(checkpoint, "open", unreadable, raising=False)
    assert not plan(tmp_path).done and odd.exists()


def test_overwrite_stops_before_removing_anything_at_a_file_it_cannot_prove_is_its_own(tmp_path):
    save_net(tmp_path / "epoch_001.pth")
    (tmp_path / "epoch_002.pth").write_bytes(b"")  # damaged, or someone else's
    save_net(tmp_path / "last.pth")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KamalError, match=r"--overwrite removes only this project's checkpoints, "
                       r"and .*epoch_002.pth does not load as one \(the file is empty\): move or remove it"):
        plan(tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_nets_made_before_the_recipe_changed_form_are_still_reused(tmp_path):
    """Earlier versions put the data's folder in the recipe, and ImageNet starting weights by
    file name only: such a net is reused (and resumed) as long as the rest matches."""
    recipe = {"seed": 1, "data": "abc", "init": "ImageNet weights r18.pth (sha256 0123456789abcdef)"}
    old = {"seed": 1, "data": "abc", "data_root": "/where/it/was", "init": "ImageNet weights r18.pth"}
    save_net(tmp_path / "epoch_002.pth", epoch=2, recipe=old)
    assert plan_training(tmp_path, 2, recipe, False, "net", "this command").done
    # another file name, or other data, is still another recipe (and said without data_root)
    with pytest.raises(KamalError, match=r"init: ImageNet weights r18.pth -> ImageNet weights "
                       r"r34.pth \(sha256 0123456789abcdef\)\)"):
        plan_training(tmp_path, 2, {**recipe, "init": recipe["init"].replace("r18", "r34")},
                      False, "net", "this command")
    with pytest.raises(KamalError, match=r"another recipe \(checkpoint -> this run: data: abc -> xyz\)"):
        plan_training(tmp_path, 2, {**recipe, "data": "xyz"}, False, "net", "this command")


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "last.pth"
    before = save_net(path)
    with pytest.raises(Exception):  # torch.save fails half-way: a lambda cannot be pickled
        atomic_save({**before, "epoch": 2, "bad": lambda: 0}, path)
    assert load_checkpoint(path)["digest"] == before["digest"] and load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


class Planned(Exception):
    """Raised in place of planning a source net: carries the recipe it was given."""


def source_recipe(flags: list[str], root: Path, data: Path, monkeypatch) -> dict:
    """The recipe ``train_sourcenet.py`` writes into a source net's checkpoints (nothing trained)."""
    def planned(out_dir, epochs, recipe, *args, **kwargs):
        raise Planned(recipe)
    monkeypatch.setattr(stages, "plan_net", planned)
    args = ["--target_attribute", "Young", "--source_id", "3", "--epochs", "3", "--width", "4",
            "--pretrained", "none", "--data_root", str(data), "--save_root", str(root),
            "--image_size", "32", "--batch_size", "6", "--workers", "0", "--device", "cpu"]
    with pytest.raises(Planned) as caught:
        train_sourcenet.main(train_sourcenet.get_args_parser().parse_args(args + flags))
    return caught.value.args[0]


def test_the_recipe_changes_with_what_decides_the_weights_and_not_with_where_things_are(
        tmp_path, synthetic_root, monkeypatch):
    from kamal_attr.synthetic import generate
    base = source_recipe([], tmp_path, synthetic_root, monkeypatch)
    other_data = generate(tmp_path / "other", num_images=54, seed=2, workers=1)
    changes = {"--seed": ["--seed", "5"], "--batch_size": ["--batch_size", "8"],
               "--lr": ["--lr", "0.01"], "--optimizer": ["--optimizer", "adam"],
               "--schedule": ["--schedule", "cosine"], "--epochs": ["--epochs", "4"],
               "--image_size": ["--image_size", "48"], "--width": ["--width", "6"],
               "--arch": ["--arch", "resnet34"], "--train_part": ["--train_part", "1/2"]}
    for flag, flags in changes.items():
        recipe = source_recipe(flags, tmp_path, synthetic_root, monkeypatch)
        assert fingerprint(recipe) != fingerprint(base), f"{flag} does not enter the recipe"
    data = source_recipe(["--data_root", str(other_data)], tmp_path, synthetic_root, monkeypatch)
    assert data["data"] != base["data"], "other data does not enter the recipe"
    # the same dataset copied elsewhere (a job's scratch disk) and other output folders
    copy = tmp_path / "scratch/celeba"
    shutil.copytree(synthetic_root, copy)
    for flags in (["--data_root", str(copy)], ["--save_root", str(tmp_path / "elsewhere")],
                  ["--workers", "1"]):
        assert source_recipe(flags, tmp_path, synthetic_root, monkeypatch) == base, flags
    assert json.loads(json.dumps(base)) == base  # plain JSON values, as the checkpoints store it


def test_files_are_written_with_the_mode_open_gives_not_mkstemps(tmp_path):
    """Nets and caches on a shared disk must be readable by other users' jobs: 0666 less
    the umask, as every other file the scripts write (mkstemp's 0600 would hide them)."""
    old = os.umask(0o022)
    try:
        atomic_save({"x": 1}, tmp_path / "net.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "net.pth").stat().st_mode & 0o777 == 0o644
