"""Shared fixtures: tiny CelebA folders written on the fly (no data ships with the tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kamal_attr.attributes import CELEBA_ATTRIBUTES
from kamal_attr.synthetic import generate


def write_celeba(root: Path, n: int = 6, kind: str = "official", lists_dir: str = "",
                 image_dir: str = "img_align_celeba", newline: str = "\n",
                 sep: str = " ") -> np.ndarray:
    """Write ``n`` 8x8 images and the lists in one layout; returns the 0/1 labels written."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (n, 40))
    images = root / image_dir
    images.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 7 * i % 256, np.uint8)).save(images / name)
    partition = [i % 3 for i in range(n)]
    lists = root if lists_dir == "split" else root / lists_dir
    lists.mkdir(parents=True, exist_ok=True)
    if kind == "kaggle":
        rows = ["image_id," + ",".join(CELEBA_ATTRIBUTES)]
        rows += [n_ + "," + ",".join("1" if v else "-1" for v in row) for n_, row in zip(names, labels)]
        (lists / "list_attr_celeba.csv").write_text(newline.join(rows) + newline)
        rows = ["image_id,partition"] + [f"{n_},{p}" for n_, p in zip(names, partition)]
        (lists / "list_eval_partition.csv").write_text(newline.join(rows) + newline)
    else:
        rows = [str(n), sep.join(CELEBA_ATTRIBUTES)]
        rows += [n_ + sep + sep.join("1" if v else "-1" for v in row) for n_, row in zip(names, labels)]
        attr_dir = lists / "Anno" if lists_dir == "split" else lists
        part_dir = lists / "Eval" if lists_dir == "split" else lists
        attr_dir.mkdir(exist_ok=True)
        part_dir.mkdir(exist_ok=True)
        (attr_dir / "list_attr_celeba.txt").write_text(newline.join(rows) + newline)
        (part_dir / "list_eval_partition.txt").write_text(
            newline.join(f"{n_} {p}" for n_, p in zip(names, partition)) + newline)
    return labels


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (54 drawn faces: 32 train, 5 val, 17 test)."""
    return generate(tmp_path_factory.mktemp("synthetic") / "celeba", num_images=54, seed=1, workers=1)
