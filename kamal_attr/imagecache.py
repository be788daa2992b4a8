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
is found again for the same data and never used for data of other lists (images replaced
in place under the same lists are not noticed: remove the cache then); it is written to a
temporary name and renamed when complete. Nothing is written into the data folder.
"""
from __future__ import annotations

import argparse
import errno
import functools
import glob
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .celeba import (CelebAError, cache_path, find_celeba, load_image, open_cache,
                     read_attribute_list)
from .checkpoint import as_open_makes

log = logging.getLogger("kamal_attr")
#: Images a decoding worker writes per job (the progress bar's step).
ROWS_PER_JOB = 256


def cache_file(data_root: str | Path, image_size: int, cache_dir: str | Path) -> Path:
    """Where the cache of ``data_root`` at input size ``image_size`` lives (present or not)."""
    layout = find_celeba(data_root)
    return cache_path(layout, read_attribute_list(layout.attr_file)[0][0], image_size, cache_dir)[0]


def _decode(path: Path, first: Path, size: tuple[int, int], height: int, width: int) -> np.ndarray:
    """One image as ``(height, width, 3)`` uint8; refused unless it is ``size``, as ``first``."""
    image = load_image(path)
    if image.size != size:
        raise CelebAError(f"{path} is {image.size[0]}x{image.size[1]}, the list's first image "
                          f"{first.name} {size[0]}x{size[1]}: the decoded-image cache holds "
                          "images of one size; without it, training reads the JPEGs")
    if size != (width, height):
        image = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def _decode_rows(tmp: Path, first: Path, size: tuple[int, int],
                 job: tuple[int, list[Path]]) -> int:
    """Decode a job's images (its first row, its paths) into their rows of the file being
    written at ``tmp``; every image must be ``size`` (W, H), as the list's ``first``.
    Returns how many. Each worker writes its own rows through a shared mapping: no image
    travels back to the parent, so memory stays flat however far the workers run ahead of
    the progress bar."""
    start, paths = job
    out = np.load(tmp, mmap_mode="r+")
    for i, path in enumerate(paths):
        out[start + i] = _decode(path, first, size, *out.shape[1:3])
    return len(paths)


def _die_with_parent(parent: int) -> None:
    """A decoding process's initializer: it ends once the build's process is gone. A build
    killed outright (no ``finally`` runs) would otherwise leave its workers waiting for jobs
    forever, holding the unfinished file open (its space is not freed when it is removed)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _no_room(folder: Path, data_root: str | Path, size: int) -> CelebAError:
    return CelebAError(f"{folder} has {_gigabytes(shutil.disk_usage(folder).free)} free; the "
                       f"decoded-image cache of {data_root} needs {_gigabytes(size)}: free "
                       "space, or pass --cache_dir on another disk")


def _unwritable(folder: Path, error: OSError) -> CelebAError:
    return CelebAError(f"cannot write the decoded-image cache in {folder} ({error.strerror}): "
                       "pass --cache_dir a folder you can write")


def _report_unfinished(path: Path) -> None:
    """Say where earlier builds of ``path`` left unfinished files (killed, or out of memory
    or disk, where no ``finally`` runs; up to 23.6 GB each for CelebA). They are not
    removed: whether a build elsewhere (another process, container or host) still writes
    one cannot be proved from here."""
    unfinished = sorted(path.parent.glob(glob.escape(path.name) + ".partial-*"))
    if unfinished:
        size = sum(p.lstat().st_size for p in unfinished)
        log.warning("%d unfinished file(s) of this cache from earlier builds hold %s; remove "
                    "them if no build is running: %s", len(unfinished), _gigabytes(size),
                    " ".join(str(p) for p in unfinished))


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    _report_unfinished(path)
    size = len(names) * height * width * 3
    if shutil.disk_usage(path.parent).free < size:
        raise _no_room(path.parent, data_root, size)
    first = layout.image_dir / names[0]
    with Image.open(first) as im:
        first_size = im.size
    try:
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.partial-", dir=path.parent)
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    tmp = Path(name)  # ours: mkstemp made it, under a name no other build can take
    jobs = [(start, [layout.image_dir / n for n in names[start:start + ROWS_PER_JOB]])
            for start in range(0, len(names), ROWS_PER_JOB)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    log.info("caching %d images of %s at %dx%d in %s (%s, %d workers)", len(names), data_root,
             height, width, path, _gigabytes(size), workers)
    try:
        as_open_makes(fd)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                  shape=(len(names), height, width, 3)).flush()
        try:  # the blocks now, so that a full disk is this error, not a worker's SIGBUS
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise _no_room(path.parent, data_root, size) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # no preallocation here: blocks are allocated as the rows are written
        decode = functools.partial(_decode_rows, tmp, first, first_size)
        with tqdm(total=len(names), desc="decoding images", unit="img", disable=None) as bar:
            if workers == 1:
                for rows in map(decode, jobs):
                    bar.update(rows)
            else:
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                           initializer=_die_with_parent, initargs=(os.getpid(),))
                try:
                    for rows in pool.map(decode, jobs):
                        bar.update(rows)
                except BrokenProcessPool:
                    raise CelebAError("a process decoding images died (out of memory, or of disk "
                                      f"space in {path.parent}?); nothing was kept: run again, "
                                      "with fewer --workers if memory ran out") from None
                finally:  # on an error, the jobs not started are dropped, not decoded
                    pool.shutdown(wait=True, cancel_futures=True)
        os.fsync(fd)  # every worker's rows on disk before the file takes the cache's name
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # ours (mkstemp); gone once renamed
        os.close(fd)
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
    run(lambda: print(build_cache(args.data_root, args.image_size, cache_dir, args.workers)),
        interrupted="the unfinished cache was removed: rerun the same command to build it")


if __name__ == "__main__":
    main()
