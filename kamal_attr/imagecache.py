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
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .celeba import cache_path, find_celeba, load_image, open_cache, read_attribute_list

log = logging.getLogger("kamal_attr")


def cache_file(data_root: str | Path, image_size: int, cache_dir: str | Path) -> Path:
    """Where the cache of ``data_root`` at input size ``image_size`` lives (present or not)."""
    layout = find_celeba(data_root)
    return cache_path(layout, read_attribute_list(layout.attr_file)[0][0], image_size, cache_dir)[0]


def _decode(job: tuple[Path, int, int]) -> np.ndarray:
    path, height, width = job
    image = load_image(path)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


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
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    jobs = [(layout.image_dir / n, height, width) for n in names]
    workers = workers or len(os.sched_getaffinity(0))
    log.info("caching %d images of %s at %dx%d in %s (%d workers)", len(names), data_root,
             height, width, path, workers)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(names), height, width, 3))
        bar = tqdm(total=len(jobs), desc="decoding images", unit="img", disable=None)
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for i, pixels in enumerate(pool.imap(_decode, jobs, chunksize=64)):
                    out[i] = pixels
                    bar.update()
        else:
            for i, job in enumerate(jobs):
                out[i] = _decode(job)
                bar.update()
        bar.close()
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # ours: named after this process
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m kamal_attr.imagecache``: build the cache of one dataset and image size."""
    from .cli import ArgumentParser, run
    from .config import IMAGE_SIZE, REPO_ROOT, bounded_int
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=str(REPO_ROOT / "data" / "CelebA"),
                   help="CelebA folder (default data/CelebA)")
    p.add_argument("--image_size", type=IMAGE_SIZE, default=224,
                   help="input size the cache serves (224; demo 64)")
    p.add_argument("--cache_dir", default=str(REPO_ROOT / "data" / "cache"),
                   help="where caches live (default data/cache/)")
    p.add_argument("--workers", type=bounded_int(1), default=None,
                   help="decoding processes (default: the cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(lambda: print(build_cache(args.data_root, args.image_size, args.cache_dir, args.workers)))


if __name__ == "__main__":
    main()
