"""CelebA on disk, in the layouts people really have, as a ``torch.utils.data.Dataset``.

Layouts found under ``root`` (also under ``root/celeba``, torchvision's folder):
- official: ``img_align_celeba/`` (or ``Img/img_align_celeba/``), ``list_attr_celeba.txt``
  (at the root or in ``Anno/``), ``list_eval_partition.txt`` (at the root or in ``Eval/``);
- Kaggle: ``list_attr_celeba.csv``, ``list_eval_partition.csv``, images possibly in
  ``img_align_celeba/img_align_celeba/``.
Labels 1/-1 become 1/0 in :func:`read_attribute_list`, the one place that parses them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from . import KamalError, first_line
from .attributes import CELEBA_ATTRIBUTES, check_attribute
from .precision import float32_region

SPLITS = {"train": 0, "val": 1, "test": 2}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CelebAError(KamalError):
    """Malformed or missing CelebA files; the message names the file (and line)."""


@dataclass(frozen=True)
class CelebALayout:
    kind: str  # "official" or "kaggle"
    image_dir: Path
    attr_file: Path
    partition_file: Path

    def describe(self) -> str:
        return (f"{self.kind} CelebA layout: images {self.image_dir}, attributes "
                f"{self.attr_file.name}, partition {self.partition_file.name}")


def _first(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def _image_dir(base: Path) -> Path | None:
    for cand in (base / "img_align_celeba" / "img_align_celeba", base / "img_align_celeba",
                 base / "Img" / "img_align_celeba"):
        if cand.is_dir() and any(cand.glob("*.jpg")):
            return cand
    return None


def find_celeba(root: str | Path) -> CelebALayout:
    """Find CelebA's images and lists under ``root``; raise naming what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise CelebAError(f"data root {root} does not exist; put CelebA there "
                          "(img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt) "
                          "or pass --data_root, or run with --demo for the synthetic dataset")
    for base in (root, root / "celeba", root / "CelebA"):
        attr_txt = _first(base / "list_attr_celeba.txt", base / "Anno" / "list_attr_celeba.txt")
        part_txt = _first(base / "list_eval_partition.txt",
                          base / "Eval" / "list_eval_partition.txt",
                          base / "Anno" / "list_eval_partition.txt")
        attr_csv, part_csv = base / "list_attr_celeba.csv", base / "list_eval_partition.csv"
        if attr_txt or part_txt:
            kind, attr, part = "official", attr_txt, part_txt
        elif attr_csv.exists() or part_csv.exists():
            kind, attr, part = "kaggle", attr_csv, part_csv
        else:
            continue
        if attr is None or not attr.exists():
            raise CelebAError(f"{base}: found the partition list but no attribute list "
                              "(list_attr_celeba.txt at the root or in Anno/, or "
                              "list_attr_celeba.csv)")
        if part is None or not part.exists():
            raise CelebAError(f"{base}: found {attr.name} but no partition list "
                              "(list_eval_partition.txt at the root or in Eval/, or "
                              "list_eval_partition.csv)")
        images = _image_dir(base)
        if images is None:
            raise CelebAError(f"{base}: found the lists but no image folder "
                              "(img_align_celeba/, Img/img_align_celeba/ or "
                              "img_align_celeba/img_align_celeba/ with .jpg files)")
        return CelebALayout(kind, images, attr, part)
    raise CelebAError(f"no CelebA under {root}: expected list_attr_celeba.txt (root or Anno/) "
                      "or list_attr_celeba.csv, beside img_align_celeba/; pass --data_root, "
                      "or use --demo for the synthetic dataset")


def _read_lines(path: Path) -> list[str]:
    """Text lines of ``path`` (any line ending); an HTML page (a failed download) is refused."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CelebAError(f"cannot read {path}: {e.strerror}") from None
    head = raw[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        raise CelebAError(f"{path} is an HTML page, not a CelebA list (a failed or "
                          "quota-limited download?); download it again")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CelebAError(f"{path} is not a text file") from None
    return text.splitlines()


def _fields(line: str, csv: bool) -> list[str]:
    return [f.strip() for f in line.split(",")] if csv else line.split()


def read_attribute_list(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt`` (or Kaggle's CSV) into file names and 0/1 labels.

    Returns ``(file_names, labels)`` with ``labels`` a uint8 array of shape (N, 40) in
    :data:`CELEBA_ATTRIBUTES` column order, 1 where the file says 1 and 0 where it says -1.
    """
    path = Path(path)
    csv = path.suffix.lower() == ".csv"
    lines = _read_lines(path)
    lineno = 0
    if not csv:  # line 1: the image count
        if not lines or not lines[0].strip().isdigit():
            raise CelebAError(f"{path}:1: expected the image count, got {lines[0][:40]!r}"
                              if lines else f"{path} is empty")
        count, lineno = int(lines[0]), 1
    if len(lines) <= lineno:
        raise CelebAError(f"{path}:{lineno + 1}: missing the header of attribute names")
    header = _fields(lines[lineno], csv)
    if csv:
        header = header[1:]  # "image_id"
    if len(header) != 40 or set(header) != set(CELEBA_ATTRIBUTES):
        unknown = [h for h in header if h not in CELEBA_ATTRIBUTES]
        raise CelebAError(f"{path}:{lineno + 1}: expected the 40 CelebA attribute names, got "
                          f"{len(header)} names" + (f" (unknown: {unknown[:5]})" if unknown else ""))
    order = [header.index(a) for a in CELEBA_ATTRIBUTES]
    names: list[str] = []
    rows: list[list[int]] = []
    for i, line in enumerate(lines[lineno + 1:], start=lineno + 2):
        fields = _fields(line, csv)
        if not fields or fields == [""]:
            continue
        if len(fields) != 41:
            raise CelebAError(f"{path}:{i}: expected a file name and 40 values, "
                              f"got {len(fields)} fields")
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            values = []
        if len(values) != 40 or any(v not in (1, -1) for v in values):
            bad = next((v for v in fields[1:] if v not in ("1", "-1")), "?")
            raise CelebAError(f"{path}:{i}: attribute values must be 1 or -1, got {bad!r}")
        names.append(fields[0])
        rows.append(values)
    if not csv and len(names) != count:
        raise CelebAError(f"{path}: line 1 says {count} images but {len(names)} are listed")
    labels = (np.asarray(rows, dtype=np.int8).reshape(-1, 40)[:, order] > 0).astype(np.uint8)
    return names, labels


def read_partition_list(path: str | Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` (or CSV): file name -> 0 train, 1 val, 2 test."""
    path = Path(path)
    csv = path.suffix.lower() == ".csv"
    lines = _read_lines(path)
    start = 1 if csv else 0  # Kaggle's CSV has a header "image_id,partition"
    partition: dict[str, int] = {}
    for i, line in enumerate(lines[start:], start=start + 1):
        fields = _fields(line, csv)
        if not fields or fields == [""]:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise CelebAError(f"{path}:{i}: expected 'file_name 0|1|2', got {line.strip()[:60]!r}")
        partition[fields[0]] = int(fields[1])
    return partition


def eval_resize(image_size: int) -> int:
    """The eval resize of the paper (256 for 224) scaled to ``image_size``."""
    return round(image_size * 256 / 224)


def resized_shape(height: int, width: int, short: int) -> tuple[int, int]:
    """``(H, W)`` after ``transforms.Resize(short)``: the shorter side becomes ``short``,
    the longer one ``int(short * long / shorter)`` (truncated, as torchvision does)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def eval_geometry(image_size: int) -> Callable:
    """The paper's eval view at ``image_size``: ``Resize(S * 256/224)`` + ``CenterCrop(S)``."""
    return transforms.Compose([transforms.Resize(eval_resize(image_size)),
                               transforms.CenterCrop(image_size)])


#: Normalisation of every net's input (ImageNet mean/std, as the paper's ResNet-18s).
TO_TENSOR = transforms.Compose([transforms.ToTensor(),
                                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


#: Written by the synthetic-data generator (:mod:`kamal_attr.synthetic`) into every dataset
#: it draws, with the version of its drawings.
SYNTHETIC_MARKER = ".kamal_attr_synthetic"


def drawing_version(folder: Path) -> int | None:
    """The drawing version of the synthetic dataset whose lists are in ``folder`` (1 for a
    marker without one), or ``None`` for data the generator did not write."""
    marker = Path(folder) / SYNTHETIC_MARKER
    if not marker.is_file():
        return None
    try:
        return int(json.loads(marker.read_text()).get("drawing", 1))
    except (ValueError, AttributeError, TypeError):
        return 1


def list_digest(layout: CelebALayout) -> str:
    """SHA-256 (16 hex digits) of a dataset's attribute and partition lists and, for the
    synthetic data, of its drawing version (faces drawn anew under the same lists are other
    data: caches and nets made from the old drawings go stale; version 1 adds nothing, so
    the digests of datasets drawn before versions existed are unchanged)."""
    h = hashlib.sha256()
    for path in (layout.attr_file, layout.partition_file):
        h.update(path.read_bytes())
    version = drawing_version(layout.attr_file.parent)
    if version is not None and version > 1:
        h.update(f"drawing {version}".encode())
    return h.hexdigest()[:16]


def stored_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """``(H, W)`` of a stored image: as ``Resize(eval resize)`` makes it when that shrinks
    the image (so the eval view is a plain crop of it), else the original size."""
    if min(width, height) <= eval_resize(image_size):
        return height, width
    return resized_shape(height, width, eval_resize(image_size))


def cache_path(layout: CelebALayout, first_name: str, image_size: int,
               cache_dir: str | Path) -> tuple[Path, tuple[int, int]]:
    """Where the decoded-image cache (:mod:`kamal_attr.imagecache`) of this dataset at input
    size ``image_size`` lives, present or not, and the ``(H, W)`` it stores images at
    (from the size of the list's first image, ``first_name``): named by the lists' hash,
    so it is never used for data of other lists."""
    with Image.open(layout.image_dir / first_name) as im:
        shape = stored_size(*im.size, image_size)
    return Path(cache_dir) / f"{list_digest(layout)}-{shape[0]}x{shape[1]}.npy", shape


def open_cache(path: Path, num_images: int) -> np.ndarray:
    """The memory-mapped array at ``path``; raises naming the file if it is not a cache of
    ``num_images`` images."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise CelebAError(f"image cache {path} cannot be read ({first_line(e)}); "
                          "remove it and run python -m kamal_attr.imagecache again") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != num_images \
            or images.shape[3] != 3:
        raise CelebAError(f"image cache {path} holds {images.dtype} {images.shape}, not "
                         f"{num_images} RGB images; remove it and run "
                         "python -m kamal_attr.imagecache again")
    return images


class TrainAugment:
    """The paper's training view: ``RandomResizedCrop(S, scale=(0.81, 1), ratio=(3/4, 4/3))``
    and a horizontal flip, drawn from an explicit ``numpy`` generator.

    Why not torchvision's transforms: they draw from the global torch RNG, so the crops of
    an epoch would depend on everything that ran before it. Drawing them from a generator
    seeded by ``(seed, epoch, index)`` makes each epoch a pure function of the seed: a run
    resumed at epoch e sees the same crops as an uninterrupted one, and any number of
    loader workers (or processes) draws the same crop for the same image.
    """

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.81, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.image_size = image_size
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of a crop of ``scale`` of the area and an aspect
        ratio log-uniform in ``ratio`` (10 tries, then the central crop, as torchvision)."""
        area = width * height
        for _ in range(10):
            u = rng.random(4)
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            aspect = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[1])
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = self.crop_box(image.width, image.height, rng)
        image = transforms.functional.resized_crop(image, top, left, h, w,
                                                   [self.image_size, self.image_size])
        return transforms.functional.hflip(image) if rng.random() < 0.5 else image


def load_image(path: Path) -> Image.Image:
    """Decode one image to RGB, or raise a :class:`CelebAError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise CelebAError(f"image missing: {path}") from None
    except OSError as e:
        raise CelebAError(f"cannot decode {path}: {e}") from None


def pixel_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std on the 0-255 scale, ``(1, 3, 1, 1)`` float32 on ``device``:
    made once per loader, since a tensor built from Python numbers on a GPU is a copy the
    host waits for, and the views of every batch use them."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1).mul(255).to(device)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))
    return mean, std


def device_views(pixels: torch.Tensor, boxes: torch.Tensor, image_size: int,
                 statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Crop, resize, flip and normalise a batch of stored images on their device.

    ``pixels`` ``(B, H, W, 3)`` uint8, ``boxes`` ``(B, 5)``: ``top, left, height, width``
    (pixels) and ``flip`` (0/1), as :meth:`CelebA.view_box` draws them. Each box becomes an
    affine sampling grid (``x -> (w/W) x + (2 left + w)/W - 1`` in ``grid_sample``'s
    coordinates, negated for a flip) and one bilinear ``grid_sample`` resamples the whole
    batch; returns ``(B, 3, S, S)`` float32, ImageNet-normalised (``statistics``: those of
    :func:`pixel_statistics` on the device, made here if not given), channels-last.

    Always in float32, also inside autocast (validation reads its batches there): autocast
    would compute affine_grid's grid in bf16, up to half a stored pixel off.
    """
    batch, height, width, _ = pixels.shape
    with float32_region(pixels.device.type):
        images = pixels.permute(0, 3, 1, 2).float()
        top, left, h, w, flip = boxes.float().unbind(1)
        theta = torch.zeros(batch, 2, 3, device=pixels.device)
        theta[:, 0, 0] = w / width * (1 - 2 * flip)
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        grid = torch.nn.functional.affine_grid(theta, [batch, 3, image_size, image_size],
                                               align_corners=False)
        out = torch.nn.functional.grid_sample(images, grid, mode="bilinear",
                                              padding_mode="border", align_corners=False)
        mean, std = statistics if statistics is not None else pixel_statistics(out.device)
        return ((out - mean) / std).contiguous(memory_format=torch.channels_last)


class CelebA(Dataset):
    """One split of CelebA: ``(image, labels, index)`` with labels for ``attributes``.

    ``train=True`` gives the augmented view, drawn per image from ``(seed, epoch, index)``
    (:class:`TrainAugment`; the training loop calls :meth:`set_epoch`), else the eval view.

    ``index`` is the position inside this split (and ``part``), so a method can look up
    per-image data such as the entropy routing. ``part=(k, P)`` keeps the k-th of P disjoint
    contiguous blocks of the split (1-based): published teachers come from different data.

    ``cache_dir``: where to look for the dataset's decoded-image cache (:func:`cache_path`).
    When it is there (read memory-mapped into ``stored``), an item is ``(pixels, labels,
    index, box)``: the stored uint8 image and the box of its view, which
    :func:`device_views` cuts out on the device, and no JPEG is read. The box is drawn from
    the same generator as :class:`TrainAugment`'s.
    """

    def __init__(self, root: str | Path, split: str, attributes: Sequence[str],
                 image_size: int = 224, train: bool = False,
                 part: tuple[int, int] | None = None, cache_dir: str | Path | None = None,
                 limit: int | None = None) -> None:
        if split not in SPLITS:
            raise CelebAError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        self.layout = find_celeba(root)
        self.attributes = tuple(check_attribute(a) for a in attributes)
        names, labels = read_attribute_list(self.layout.attr_file)
        partition = read_partition_list(self.layout.partition_file)
        missing = [n for n in names if n not in partition]
        if missing:
            raise CelebAError(f"{self.layout.partition_file}: no split for {len(missing)} "
                              f"images listed in {self.layout.attr_file.name}, e.g. {missing[0]}")
        keep = [i for i, n in enumerate(names) if partition[n] == SPLITS[split]]
        if part is not None:
            k, parts = part
            keep = keep[(k - 1) * len(keep) // parts: k * len(keep) // parts]
        if limit is not None:
            keep = keep[:limit]
        if not keep:
            raise CelebAError(f"{self.layout.partition_file}: the {split} split is empty")
        self.files = [self.layout.image_dir / names[i] for i in keep]
        self.rows = keep
        self.stored: np.ndarray | None = None
        if cache_dir is not None:
            path, _ = cache_path(self.layout, names[0], image_size, cache_dir)
            if path.exists():
                self.stored = open_cache(path, len(names))
        if self.stored is None:
            absent = next((f for f in self.files if not f.exists()), None)
            if absent is not None:
                raise CelebAError(f"image missing: {absent} (listed in {self.layout.attr_file})")
        columns = [CELEBA_ATTRIBUTES.index(a) for a in self.attributes]
        self.labels = torch.from_numpy(labels[keep][:, columns].astype(np.int64))
        self.image_size = image_size
        self.train = train
        self.augment = TrainAugment(image_size)
        self.eval_view = eval_geometry(image_size)
        self.seed, self.epoch = 0, 0

    def __getstate__(self) -> dict:
        """A memory-mapped cache travels to loader workers as its path and is reopened
        there, never copied (workers started by spawn or forkserver pickle the dataset)."""
        state = self.__dict__.copy()
        if isinstance(self.stored, np.memmap) and self.stored.filename:
            state["stored"] = Path(self.stored.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(self.stored, Path):
            self.stored = np.load(self.stored, mmap_mode="r")

    def view(self, train: bool) -> "CelebA":
        """The same images with the train or eval view."""
        other = copy.copy(self)
        other.train = train
        return other

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Draw the augmentation of image ``i`` from ``(seed, epoch, i)`` from now on."""
        self.seed, self.epoch = seed, epoch

    def view_box(self, index: int, height: int, width: int) -> torch.Tensor:
        """``(top, left, h, w, flip)`` of image ``index``'s view in a stored ``height x width``
        image: a :class:`TrainAugment` draw, or the eval view's centred square (the part
        that ``Resize(S * 256/224)`` + ``CenterCrop(S)`` keeps)."""
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            top, left, h, w = self.augment.crop_box(width, height, rng)
            return torch.tensor([top, left, h, w, float(rng.random() < 0.5)])
        size = self.image_size
        resized_h, resized_w = resized_shape(height, width, eval_resize(size))
        scale_h, scale_w = height / resized_h, width / resized_w  # stored per resized pixel
        return torch.tensor([round((resized_h - size) / 2) * scale_h,
                             round((resized_w - size) / 2) * scale_w,
                             size * scale_h, size * scale_w, 0.0])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if self.stored is not None:
            pixels = torch.from_numpy(np.array(self.stored[self.rows[index]]))
            return pixels, self.labels[index], index, self.view_box(index, *pixels.shape[:2])
        image = load_image(self.files[index])
        if self.train:
            image = self.augment(image, np.random.default_rng((self.seed, self.epoch, index)))
        else:
            image = self.eval_view(image)
        return TO_TENSOR(image), self.labels[index], index
