"""Decoded images on disk, so that an epoch reads no JPEG.

    python -m kamal_attr.imagecache --data_root data/CelebA --image_size 224

decodes every image of a CelebA folder once, in the order of its attribute list, into one
``uint8`` array ``(N, H, W, 3)`` saved as ``.npy`` and read back memory-mapped: a batch is
a slice of pages the OS keeps cached, and crops, flips and normalisation run on the device
(:func:`kamal_attr.celeba.device_views`). Images are stored at the size the views need:
shorter side ``min(original, round(S * 256 / 224))`` for input size S, i.e. CelebA's
178x218 as they are for 224 px (about 23.6 GB for the 202,599 images), 73x89 for the demo's
64 px.

The file is named by a hash of the dataset's lists and the stored size
(``<digest>-<H>x<W>.npy`` under ``--cache_dir``, default ``data/cache/``), so a cache
is found again for the same data and never used for other data; it is written to a
temporary name and renamed when complete. Nothing is written into the data folder.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import multiprocessing
import os
import shutil
import socket
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .celeba import (CelebAError, cache_path, find_celeba, load_image, open_cache,
                     read_attribute_list)

log = logging.getLogger("kamal_attr")
#: Images a decoding worker writes per job (the progress bar's step).
ROWS_PER_JOB = 256


def cache_file(data_root: str | Path, image_size: int, cache_dir: str | Path) -> Path:
    """Where the cache of ``data_root`` at input size ``image_size`` lives (present or not)."""
    layout = find_celeba(data_root)
    return cache_path(layout, read_attribute_list(layout.attr_file)[0][0], image_size, cache_dir)[0]


def _decode(path: Path, size: tuple[int, int], height: int, width: int) -> np.ndarray:
    """One image as ``(height, width, 3)`` uint8; refused if it is not ``size`` (W, H)."""
    image = load_image(path)
    if image.size != size:
        raise CelebAError(f"{path} is {image.size[0]}x{image.size[1]}, the list's first image "
                          f"{size[0]}x{size[1]}: the decoded-image cache holds images of one "
                          "size; without it, training reads the JPEGs")
    if size != (width, height):
        image = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def _decode_rows(job: tuple[Path, int, list[Path], tuple[int, int]]) -> int:
    """Decode ``paths`` into the rows from ``start`` of the cache being written at ``tmp``;
    returns how many. Each worker writes its own rows: no image travels back to the parent,
    so memory stays flat however far the workers run ahead of the progress bar."""
    tmp, start, paths, size = job
    out = np.load(tmp, mmap_mode="r+")
    for i, path in enumerate(paths):
        out[start + i] = _decode(path, size, *out.shape[1:3])
    out.flush()
    return len(paths)


def _partial_prefix(path: Path) -> str:
    """Start of the name a build writes ``path`` under: ``<name>.partial-<host>-``, then its
    process id; a leftover is recognised (and known dead) by host and process id."""
    return f"{path.name}.partial-{socket.gethostname()}-"


def _remove_abandoned(path: Path) -> None:
    """Remove the unfinished files of ``path`` left by builds on this host whose process is
    gone (killed, or out of memory or disk, where no ``finally`` runs): ours by name, and
    no process can write them any more. Up to 23.6 GB each for CelebA."""
    prefix = _partial_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _running(int(pid)):
            log.info("removing %s, left by an interrupted build (%.1f GB)", tmp,
                     tmp.stat().st_size / 1e9)
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def build_cache(data_root: str | Path, image_size: int, cache_dir: str | Path,
                workers: int | None = None) -> Path:
    """Decode every image of ``data_root`` into the cache for ``image_size`` (see the module
    docstring); returns its path, without work if it exists."""
    layout = find_celeba(data_root)
    names, _ = read_attribute_list(layout.attr_file)
    path, (height, width) = cache_path(layout, names[0], image_size, cache_dir)
    if path.exists():
        open_cache(path, len(names))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    size = len(names) * height * width * 3
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise CelebAError(f"{path.parent} has {free / 1e9:.1f} GB free; the decoded-image cache "
                          f"of {data_root} needs {size / 1e9:.1f} GB: free space, or pass "
                          "--cache_dir on another disk")
    with Image.open(layout.image_dir / names[0]) as first:
        first_size = first.size
    tmp = path.with_name(_partial_prefix(path) + str(os.getpid()))
    jobs = [(tmp, start, [layout.image_dir / n for n in names[start:start + ROWS_PER_JOB]],
             first_size) for start in range(0, len(names), ROWS_PER_JOB)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    log.info("caching %d images of %s at %dx%d in %s (%.1f GB, %d workers)", len(names),
             data_root, height, width, path, size / 1e9, workers)
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                  shape=(len(names), height, width, 3)).flush()
        with tqdm(total=len(names), desc="decoding images", unit="img", disable=None) as bar, \
                contextlib.ExitStack() as stack:
            if workers > 1:
                pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers))
                done = pool.imap_unordered(_decode_rows, jobs)
            else:
                done = map(_decode_rows, jobs)
            for rows in done:
                bar.update(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # ours: named after this process
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m kamal_attr.imagecache``: build the cache of one dataset and image size."""
    from .cli import ArgumentParser, run
    from .config import IMAGE_SIZE, REPO_ROOT, bounded_int, cache_root
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=str(REPO_ROOT / "data" / "CelebA"),
                   help="CelebA folder (default data/CelebA)")
    p.add_argument("--image_size", type=IMAGE_SIZE, default=224,
                   help="input size the cache serves (224; demo 64)")
    p.add_argument("--save_root", help="root of the outputs, as given to the scripts "
                   "(default: the repository)")
    p.add_argument("--cache_dir", help="where caches live, under --save_root as in the "
                   "scripts (default data/cache/)")
    p.add_argument("--workers", type=bounded_int(1), default=None,
                   help="decoding processes (default: the cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = cache_root(args.save_root, args.cache_dir)
    run(lambda: print(build_cache(args.data_root, args.image_size, cache_dir, args.workers)))


if __name__ == "__main__":
    main()
