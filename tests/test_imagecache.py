"""The decoded-image cache and the views cut from it on the device."""
import errno
import faulthandler
import os
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from kamal_attr import KamalError
from kamal_attr.celeba import CelebA, device_views, find_celeba, open_cache, read_attribute_list
from kamal_attr import imagecache
from kamal_attr.imagecache import build_cache, cache_file

ATTRS = ["Black_Hair", "Smiling"]


@pytest.fixture(scope="module")
def cached(synthetic_root, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    before = sorted(p.relative_to(synthetic_root) for p in synthetic_root.rglob("*"))
    path = build_cache(synthetic_root, 32, cache_dir, workers=1)
    assert sorted(p.relative_to(synthetic_root) for p in synthetic_root.rglob("*")) == before, \
        "building the cache wrote into the data folder"
    return path


def test_cache_holds_every_image_at_the_eval_resize(cached, synthetic_root):
    images = open_cache(cached, 54)
    assert images.shape == (54, 45, 37, 3) and images.dtype == np.uint8  # 178x218 -> short side 37
    assert cached.name.endswith("-45x37.npy") and cached == cache_file(synthetic_root, 32, cached.parent)
    mtime = cached.stat().st_mtime_ns
    assert build_cache(synthetic_root, 32, cached.parent) == cached and cached.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("train", [False, True])
def test_device_views_match_the_jpeg_views(cached, synthetic_root, train):
    jpeg = CelebA(synthetic_root, "train", ATTRS, image_size=32, train=train)
    fast = CelebA(synthetic_root, "train", ATTRS, image_size=32, train=train, cache_dir=cached.parent)
    assert jpeg.stored is None and fast.stored is not None
    for data in (jpeg, fast):
        data.set_epoch(3, seed=7)
    for index in range(4):
        expected, labels, i = jpeg[index]
        pixels, labels_c, i_c, box = fast[index]
        assert torch.equal(labels, labels_c) and i == i_c == index
        got = device_views(pixels[None], box[None], 32)[0]
        assert got.shape == expected.shape
        if train:  # the same crop and flip, drawn from (seed, epoch, index); resampled alike
            assert (got - expected).abs().mean() < 0.12, f"image {index}: train views differ"
        else:  # Resize + CenterCrop of the stored (already resized) image: the same pixels
            assert torch.allclose(got, expected, atol=1e-4), f"image {index}: eval views differ"


@pytest.mark.parametrize("size", [96, 128, 224])
def test_eval_views_match_at_other_sizes(synthetic_root, tmp_path, size):
    """Stored shrunk (96, 128 px: Resize's own output) or as drawn (224 px: upsampled on the
    device), the eval view is the JPEG path's Resize + CenterCrop."""
    build_cache(synthetic_root, size, tmp_path, workers=1)
    jpeg = CelebA(synthetic_root, "test", ATTRS, image_size=size)
    fast = CelebA(synthetic_root, "test", ATTRS, image_size=size, cache_dir=tmp_path)
    assert fast.stored is not None
    for index in range(3):
        pixels, _, _, box = fast[index]
        diff = (device_views(pixels[None], box[None], size)[0] - jpeg[index][0]).abs()
        limit = 1e-4 if size < 178 * 256 / 224 else 0.03  # upsampling: PIL vs grid_sample
        assert diff.mean() < limit, f"{size} px, image {index}: eval views differ by {diff.mean():.4f}"


@pytest.mark.parametrize("train", [False, True])
def test_device_views_ignore_autocast(cached, synthetic_root, train):
    """Validation reads its batches inside bf16 autocast (``predict_many``): the views must
    still be cut in float32 (autocast would put affine_grid's bmm, the sampling grid, in
    bf16, off by up to half a stored pixel)."""
    fast = CelebA(synthetic_root, "train", ATTRS, image_size=32, train=train, cache_dir=cached.parent)
    fast.set_epoch(3, seed=7)
    items = [fast[i] for i in range(4)]
    pixels, boxes = torch.stack([item[0] for item in items]), torch.stack([item[3] for item in items])
    plain = device_views(pixels, boxes, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = device_views(pixels, boxes, 32)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)


def test_a_flipped_box_mirrors_the_view(cached):
    pixels = torch.from_numpy(np.array(open_cache(cached, 54)[:2]))
    box = torch.tensor([[2.0, 3.0, 30.0, 28.0, 0.0], [2.0, 3.0, 30.0, 28.0, 1.0]])
    views = device_views(pixels[[0, 0]], box, 32)
    assert torch.allclose(views[1], views[0].flip(-1), atol=1e-5)


def test_workers_write_the_same_cache_as_one_process(cached, synthetic_root, tmp_path, monkeypatch):
    """Each worker decodes its jobs' images into their rows itself (7 jobs on 2 workers)."""
    monkeypatch.setattr(imagecache, "ROWS_PER_JOB", 8)
    path = build_cache(synthetic_root, 32, tmp_path, workers=2)
    assert path.name == cached.name and np.array_equal(np.load(path), np.load(cached))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_image_of_another_size_is_refused(synthetic_root, tmp_path):
    root = tmp_path / "celeba"
    shutil.copytree(synthetic_root, root)
    first, second = read_attribute_list(find_celeba(root).attr_file)[0][:2]
    odd = find_celeba(root).image_dir / second
    with Image.open(odd) as im:
        im.resize((100, 120)).save(odd)
    with pytest.raises(KamalError, match=rf"{second} is 100x120, the list's first image {first} "
                                         r"178x218: .*holds images of one size"):
        build_cache(root, 32, tmp_path / "cache", workers=1)
    assert not list((tmp_path / "cache").iterdir()), "a refused build left a file"


def test_a_dead_worker_stops_the_build_with_nothing_left(synthetic_root, tmp_path, monkeypatch):
    """A decoding process killed (out of memory) ends the build with an error, not a hang
    (should it hang again, the test process exits after 60 s with every thread's stack)."""
    decode = imagecache._decode
    second_job = read_attribute_list(find_celeba(synthetic_root).attr_file)[0][8]

    def dies_on_the_second_job(path, *args):
        if path.name == second_job:
            os._exit(1)
        return decode(path, *args)
    monkeypatch.setattr(imagecache, "ROWS_PER_JOB", 8)
    monkeypatch.setattr(imagecache, "_decode", dies_on_the_second_job)  # forked workers see it
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        with pytest.raises(KamalError, match="a process decoding images died"):
            build_cache(synthetic_root, 32, tmp_path, workers=2)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert not list(tmp_path.iterdir())


def test_an_interrupted_builds_file_is_reported_not_removed(synthetic_root, tmp_path, caplog):
    """Whether another process, container or host still writes it cannot be proved."""
    path = cache_file(synthetic_root, 32, tmp_path)
    leftover = tmp_path / f"{path.name}.partial-x1y2z3"
    leftover.write_bytes(b"x" * 2000)
    with caplog.at_level("WARNING", logger="kamal_attr"):
        build_cache(synthetic_root, 32, tmp_path, workers=1)
    assert leftover.read_bytes() == b"x" * 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, leftover.name])
    assert f"1 unfinished file(s) of this cache from earlier builds hold 0.0 MB; remove them " \
           f"if no build is running: {leftover}" in caplog.text


def test_a_disk_without_room_is_refused_before_writing(synthetic_root, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(imagecache.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(KamalError, match=r"has 0.0 MB free; the decoded-image cache .* needs "
                                         r"0.3 MB: free space, or pass --cache_dir"):
        build_cache(synthetic_root, 32, tmp_path, workers=1)
    assert not list(tmp_path.iterdir())


def test_the_command_builds_where_the_scripts_look(synthetic_root, tmp_path, monkeypatch):
    """``--save_root`` and a relative ``--cache_dir`` mean the same folder to
    ``python -m kamal_attr.imagecache`` as to the scripts, whatever the working folder."""
    import argparse

    from kamal_attr.config import add_common_args, resolve_config
    monkeypatch.chdir(tmp_path)
    flags = ["--save_root", "out", "--cache_dir", "caches"]
    imagecache.main(["--data_root", str(synthetic_root), "--image_size", "32", "--workers", "1"]
                    + flags)
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    cfg = resolve_config(parser.parse_args(["--data_root", str(synthetic_root), "--image_size",
                                            "32", "--device", "cpu"] + flags))
    assert cache_file(synthetic_root, 32, cfg.cache_dir).exists()
    assert cfg.cache_dir.resolve() == tmp_path / "out" / "caches"


def test_a_disk_that_fills_before_the_build_is_refused_before_decoding(synthetic_root, tmp_path,
                                                                      monkeypatch):
    """The blocks are allocated up front: a full disk is an error, not a worker's SIGBUS."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(imagecache, "_decode_rows", None)  # never reached: refused before
    with pytest.raises(KamalError, match=r"free; the decoded-image cache .* needs 0.3 MB"):
        build_cache(synthetic_root, 32, tmp_path, workers=1)
    assert not list(tmp_path.iterdir())


def test_a_cache_folder_that_cannot_be_written_is_one_error_line(synthetic_root, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(KamalError, match=r"cannot write the decoded-image cache in .*file/caches "
                                         r"\(Not a directory\): pass --cache_dir a folder you can write"):
        build_cache(synthetic_root, 32, tmp_path / "file" / "caches", workers=1)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_ctrl_c_leaves_no_file_and_says_so(synthetic_root, tmp_path, monkeypatch, capsys):
    decode_rows = imagecache._decode_rows

    def interrupted_on_the_second_job(tmp, first, size, job):
        if job[0] > 0:
            raise KeyboardInterrupt
        return decode_rows(tmp, first, size, job)
    monkeypatch.setattr(imagecache, "ROWS_PER_JOB", 8)
    monkeypatch.setattr(imagecache, "_decode_rows", interrupted_on_the_second_job)
    with pytest.raises(SystemExit) as exit:
        imagecache.main(["--data_root", str(synthetic_root), "--image_size", "32",
                         "--cache_dir", str(tmp_path), "--workers", "1"])
    assert exit.value.code == 130 and not list(tmp_path.iterdir())
    assert capsys.readouterr().err.strip().endswith(
        "interrupted; the unfinished cache was removed: rerun the same command to build it")


def test_a_foreign_cache_file_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((3, 4, 4, 3), np.float32))
    with pytest.raises(KamalError, match=r"x.npy holds float32 \(3, 4, 4, 3\).*remove it"):
        open_cache(path, 3)
    path.write_bytes(b"")  # an empty file: one error line too, not numpy's EOFError
    with pytest.raises(KamalError, match=r"x.npy cannot be read \(No data left in file\); remove it"):
        open_cache(path, 3)


def test_a_worker_reopens_the_cache_instead_of_copying_it(cached, synthetic_root):
    import pickle
    data = CelebA(synthetic_root, "train", ATTRS, image_size=32, cache_dir=cached.parent)
    blob = pickle.dumps(data)
    assert len(blob) < 100_000, f"the pickled dataset carries the images ({len(blob)} bytes)"
    copy = pickle.loads(blob)
    assert isinstance(copy.stored, np.memmap) and torch.equal(copy[3][0], data[3][0])


def test_the_decoding_processes_of_a_killed_build_end_with_it(synthetic_root, tmp_path):
    """Killed outright (no ``finally`` runs), the build leaves no worker waiting forever with
    the unfinished file open."""
    import signal
    import subprocess
    import sys
    import time
    slow = ("import sys, time\n"
            "import kamal_attr.imagecache as ic\n"
            "ic.ROWS_PER_JOB = 4  # jobs for both workers\n"
            "decode = ic._decode\n"
            "ic._decode = lambda *a: (time.sleep(0.2), decode(*a))[1]\n"
            "ic.build_cache(sys.argv[1], 32, sys.argv[2], workers=2)\n")
    build = subprocess.Popen([sys.executable, "-c", slow, str(synthetic_root), str(tmp_path)],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workers: list[int] = []
    for _ in range(300):  # up to 30 s for the two workers to start
        children = f"/proc/{build.pid}/task/{build.pid}/children"
        workers = [int(p) for p in open(children).read().split()] if os.path.exists(children) else []
        if len(workers) == 2 and list(tmp_path.glob("*.partial-*")):
            break
        time.sleep(0.1)
    assert len(workers) == 2, "the build never started its workers"
    build.send_signal(signal.SIGKILL)
    build.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as status:
                return "\nState:\tZ" not in status.read()  # a zombie has ended
        except FileNotFoundError:
            return False
    deadline = time.time() + 10
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "a worker outlived the killed build"
