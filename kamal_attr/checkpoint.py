"""Checkpoint files: where they live, how they are written (atomically) and read (safely).

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(...,
weights_only=True)`` reads it: loading a downloaded teacher never runs code. Every file
records what it holds (``kind``, attribute names in head order, architecture, width, input
size and normalisation, epoch) so later stages can validate teachers before training.

Layout under the roots (``{root}/{group}/...``)::

    sources:    {sourcenets_root}/hair/source1_Black_Hair/epoch_040.pth
    components: {componentnets_root}/hair/entropy/Black_Hair/epoch_050.pth
    target:     {target_root}/hair/entropy/epoch_050.pth
    resume:     last.pth beside the epoch files (adds optimizer and scheduler state)

Every file also carries the net's *recipe* (whatever decides its weights: stage, attributes,
architecture, width, input size, data, seed, optimiser, schedule, epochs, and the weight
digests of the nets it learnt from), its ``fingerprint`` (a hash of the recipe) and the
``digest`` of its own weights. One comparison of recipes serves reuse (a finished net whose
fingerprint matches), resume (``last.pth`` of the same fingerprint) and staleness (a
different fingerprint, e.g. because a teacher was retrained: its digest changed).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch

from . import KamalError, first_line, load_failure
from .attributes import SourceNetSpec
from .celeba import IMAGENET_MEAN, IMAGENET_STD
from .models import AttributeResNet

FORMAT = "kamal_attr/1"
KINDS = ("source", "component", "target")
#: What every checkpoint's record says of its net (:func:`net_record`), with the type it is
#: read as; ``arch`` is read with a default (``resnet18``).
RECORD_TYPES = {"kind": str, "width": int, "attributes": list, "image_size": int,
                "epoch": int, "model": dict}
#: The end of :func:`atomic_save`'s temporary files, and the whole name of one left by a kill:
#: a net's file name, mkstemp's random part, this suffix. Nothing else there is removed.
TMP_SUFFIX = ".kamal_attr.tmp"
KILLED_WRITE = re.compile(r"(last|epoch_[0-9]+)\.pth\.[^.]+" + re.escape(TMP_SUFFIX))
#: How earlier versions named them (``last.pth`` + mkstemp's 8 characters + ``.tmp``): such a
#: file is removed only when empty or a torch archive named after it (:func:`_killed_write`).
OLD_KILLED_WRITE = re.compile(r"(last|epoch_[0-9]+)\.pth[a-z0-9_]{8}\.tmp")


class CheckpointError(KamalError):
    """A file that cannot be read as one of this project's checkpoints; ``reason`` says why."""

    def __init__(self, path: Path, reason: str,
                 hint: str = "if it is damaged (a crash, a full disk, a copy cut short), "
                             "remove or replace it, then rerun") -> None:
        super().__init__(f"cannot load checkpoint {path} ({reason}); {hint}")
        self.reason = reason


def epoch_file(folder: Path, epoch: int) -> Path:
    return folder / f"epoch_{epoch:03d}.pth"


def is_epoch_file(path: Path) -> bool:
    """Whether ``path`` is named as :func:`epoch_file` names a net's epochs (``epoch_007.pth``)."""
    digits = path.name.removeprefix("epoch_").removesuffix(".pth")
    return (path.name.startswith("epoch_") and digits.isascii() and digits.isdigit()
            and path.name == epoch_file(path.parent, int(digits)).name)


def available_epochs(folder: Path) -> list[int]:
    """The epochs of the ``epoch_NNN.pth`` files in ``folder``, ascending."""
    return sorted(int(p.stem[6:]) for p in folder.glob("epoch_*.pth") if is_epoch_file(p))


def other_epochs(folder: Path, flag: str) -> str | None:
    """``'<folder> has epochs 1, 2: pass one with <flag>'``, or ``None`` if it has none."""
    epochs = available_epochs(folder)
    return f"{folder} has epochs {', '.join(map(str, epochs))}: pass one with {flag}" if epochs else None


def saved_epoch(folder: Path, epoch: int, flag: str) -> Path | None:
    """``epoch_NNN.pth`` in ``folder``; ``None`` if the net was never trained (no epoch file);
    an error listing the epochs there if it was, but not to ``epoch`` (a wrong ``flag``)."""
    path = epoch_file(folder, epoch)
    if path.exists():
        return path
    others = other_epochs(folder, flag)
    if others:
        raise KamalError(f"{path} does not exist; {others}")
    return None


def source_dir(root: str | Path, spec: SourceNetSpec) -> Path:
    return Path(root) / spec.group / spec.name


def component_dir(root: str | Path, group: str, variant: str, attribute: str) -> Path:
    return Path(root) / group / variant / attribute


def target_dir(root: str | Path, group: str, variant: str) -> Path:
    return Path(root) / group / variant


def as_open_makes(fd: int) -> None:
    """Give a file that ``tempfile.mkstemp`` made (mode 0600) the mode ``open`` gives a new
    file, 0666 less the umask: a cache or net written for a team's shared disk must be
    readable by the others' jobs, as the TensorBoard files and logs beside it are. Best
    effort: a file system without modes (vfat, some FUSE mounts) keeps its own."""
    try:  # Linux says the umask without changing it; elsewhere it is set and set back
        status = Path("/proc/self/status").read_text()
        umask = int(status.split("Umask:", 1)[1].split()[0], 8)
    except (OSError, IndexError, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    except OSError:
        pass


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any],
                 exclusive: bool = False) -> None:
    """``write`` the file into a temporary file in the same folder
    (``<name>.<random>.kamal_attr.tmp``), flushed to disk, then renamed over ``path``: a
    crash or power loss mid-write never leaves a truncated or empty file under the final
    name, and a failed write leaves the previous one. ``exclusive``: linked to ``path``
    instead, which raises ``FileExistsError`` rather than replace a file that is there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=TMP_SUFFIX)
    try:
        as_open_makes(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output_path(path: str | Path, flag: str | None = None) -> None:
    """Stop before the work whose result goes to ``path`` if it could not be written there:
    the nearest existing folder above it is a file, read-only, or not ours to write.
    Nothing is created. ``flag``: the option that named ``path``, for the hint."""
    path = Path(path).absolute()
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    named = f"{flag} {path}" if flag else str(path)
    hint = f"pass another {flag}" if flag else "make it writable or choose another --save_root"
    if not folder.is_dir():
        raise KamalError(f"{named} cannot be written: {folder} is a file, not a folder; {hint}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KamalError(f"{named} cannot be written: {folder} is read-only or not yours to "
                         f"write; {hint}")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` of a checkpoint, through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str, exclusive: bool = False) -> None:
    """A text file (UTF-8), through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode()), exclusive)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every platform opens or syncs a folder
        pass


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) of a state dict's names, dtypes, shapes and values.

    Independent of memory layout (channels-last or not): it names the weights, not the file.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(recipe: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a recipe's canonical JSON."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``'key: old -> new'`` for every entry that differs (nested dicts key by key)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(none)"), new.get(key, "(none)")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += recipe_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def net_record(kind: str, model: AttributeResNet, image_size: int, epoch: int,
               recipe: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of one net: its weights, what they are and what made them."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    provenance = {} if recipe is None else {"recipe": dict(recipe), "fingerprint": fingerprint(recipe)}
    return {"format": FORMAT, "kind": kind, "arch": model.arch, "width": model.width,
            "attributes": list(model.attributes), "image_size": image_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "epoch": epoch,
            "model": state, "digest": weights_digest(state), **provenance, **extra}


@dataclass(frozen=True)
class TrainingPlan:
    """What to do for one net: reuse ``final`` (``done``), or train from ``start_epoch``,
    with ``resume`` the ``last.pth`` record to continue from (``None``: from scratch)."""

    out_dir: Path
    final: Path
    done: bool
    start_epoch: int = 1
    resume: dict[str, Any] | None = None


def read_recipe(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded recipe as this version writes recipes, so that nets made before a change
    of the recipe's form stay reusable and resumable: earlier versions named the data's
    folder (``data_root``; now recorded beside the recipe, the data entering by its digest)
    and ImageNet starting weights by file name only (now with the file's SHA-256; a
    name-only entry is read as the same file when ``new`` names a file of that name)."""
    old = {k: v for k, v in old.items() if k != "data_root"}
    init, wanted = old.get("init"), new.get("init")
    if (isinstance(init, str) and isinstance(wanted, str) and init.startswith("ImageNet weights ")
            and " (sha256 " not in init and wanted.split(" (sha256 ")[0] == init):
        old["init"] = wanted
    return old


def made_by(ckpt: Mapping[str, Any], recipe: Mapping[str, Any]) -> bool:
    """Whether a checkpoint was made by ``recipe`` (its fingerprint, or its recorded recipe
    read as this version writes it: :func:`read_recipe`)."""
    want = fingerprint(recipe)
    return ckpt.get("fingerprint") == want or (
        "recipe" in ckpt and fingerprint(read_recipe(ckpt["recipe"], recipe)) == want)


def _stale(name: str, path: Path, ckpt: Mapping[str, Any], new: Mapping[str, Any],
           retrain: str) -> KamalError:
    if "recipe" in ckpt:
        differences = recipe_diff(read_recipe(ckpt["recipe"], new), new)
        why = f"was made by another recipe (checkpoint -> this run: {'; '.join(differences)})"
    else:
        why = "records no recipe (made by an older version of this project)"
    return KamalError(f"{name}: {path} {why}; to retrain it run {retrain} with --overwrite, "
                      "or pass another --save_root")


def _killed_write(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_save` left by a kill: named as it
    names them, or as earlier versions did and then also empty or a zip whose first entry
    is under ``<its name>/`` (torch.save names its archive after the file) or ``archive/``."""
    if not path.is_file() or path.is_symlink():
        return False
    if KILLED_WRITE.fullmatch(path.name):
        return True
    if not OLD_KILLED_WRITE.fullmatch(path.name):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(30 + 256)
    except OSError:  # unreadable: not proven ours
        return False
    if not head:
        return True
    length = int.from_bytes(head[26:28], "little")
    entry = head[30:30 + length]  # torch names the archive "archive/" where the name is not ASCII
    return head[:4] == b"PK\x03\x04" and entry.startswith((f"{path.stem}/".encode(), b"archive/"))


def _remove_killed_writes(out_dir: Path) -> None:
    """Temporary files of :func:`atomic_save` left by a kill (:func:`_killed_write`)."""
    for path in out_dir.glob("*.tmp"):
        if _killed_write(path):
            path.unlink(missing_ok=True)


def clear_net(out_dir: Path) -> None:
    """Remove this project's files of one net (``--overwrite`` starts over): the
    ``epoch_NNN.pth`` files and ``last.pth`` that load as this project's checkpoints, and
    temporary files of killed writes. A file there that does not load as one (damaged, or
    someone else's) stops the run before anything is removed; other names are not touched."""
    ours = [p for p in [epoch_file(out_dir, e) for e in available_epochs(out_dir)]
            + [out_dir / "last.pth"] if p.exists()]
    for path in ours:  # all proven ours before the first is removed
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            raise KamalError(f"--overwrite removes only this project's checkpoints, and {path} "
                             f"does not load as one ({e.reason}): move or remove it yourself, "
                             "then rerun") from None
    _remove_killed_writes(out_dir)
    for path in ours:
        path.unlink()


def plan_training(out_dir: Path, epochs: int, recipe: Mapping[str, Any], overwrite: bool,
                  name: str, retrain: str) -> TrainingPlan:
    """Decide from the net's folder whether to reuse, resume or (re)start it.

    ``last.pth`` (written after every epoch) is the authority: the same fingerprint and
    ``epoch < epochs`` resumes from it; a finished net is reused only when its fingerprint
    matches; any other fingerprint stops with what differs (``retrain`` names the command
    that would retrain it). ``overwrite`` starts over, removing the net's old files.
    """
    final = epoch_file(out_dir, epochs)
    if overwrite:
        clear_net(out_dir)
        return TrainingPlan(out_dir, final, done=False)
    _remove_killed_writes(out_dir)
    last_path = out_dir / "last.pth"
    if last_path.exists():
        last = load_checkpoint(last_path)
        if not made_by(last, recipe):
            raise _stale(name, last_path, last, recipe, retrain)
        if last["epoch"] < epochs:
            return TrainingPlan(out_dir, final, done=False, start_epoch=last["epoch"] + 1, resume=last)
    if final.exists():
        ckpt = load_checkpoint(final)
        if not made_by(ckpt, recipe):
            raise _stale(name, final, ckpt, recipe, retrain)
        return TrainingPlan(out_dir, final, done=True)
    return TrainingPlan(out_dir, final, done=False)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` on the CPU; one clear error
    (:class:`CheckpointError`) if it cannot be read or is no checkpoint of this project.

    ``mmap`` maps the tensors instead of reading them, for callers that want the record
    only (the pool's scan of 22 real-size teachers would otherwise read about 1 GB); files
    in torch's legacy (non-zip) format cannot be mapped and are read whole. Mapped tensors
    keep the file open, so a record that outlives a rewrite of its file (resuming) is read
    whole."""
    path = Path(path)
    if not path.is_file():
        raise KamalError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(path, load_failure(path, e)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(path, f"no '{FORMAT}' record: not a kamal_attr checkpoint",
                              "move it out of the project's folders")
    wrong = [k for k, kind in RECORD_TYPES.items() if not isinstance(ckpt.get(k), kind)]
    if wrong:
        raise CheckpointError(path, f"its record lacks {', '.join(wrong)} or has another type "
                                    "there", "replace it with a complete copy")
    return ckpt


def load_net(path: str | Path, kind: str | None = None, attribute: str | None = None,
             image_size: int | None = None) -> tuple[AttributeResNet, dict[str, Any]]:
    """Build the net a checkpoint describes and load its weights.

    Checks, naming the file: ``kind`` matches, ``attribute`` is one of its heads, and it was
    trained at ``image_size``. Returns ``(model, record)``; the model is on the CPU in eval mode.
    """
    ckpt = load_checkpoint(path)
    if kind is not None and ckpt["kind"] != kind:
        raise KamalError(f"{path} holds a {ckpt['kind']} net, expected a {kind} net")
    if attribute is not None and attribute not in ckpt["attributes"]:
        raise KamalError(f"{path} has no head for {attribute} (it has {ckpt['attributes']})")
    if image_size is not None and ckpt["image_size"] != image_size:
        raise KamalError(f"{path} was trained at {ckpt['image_size']} px, this run uses "
                         f"{image_size} px; pass --image_size {ckpt['image_size']}")
    model = AttributeResNet(ckpt["attributes"], ckpt["width"], ckpt.get("arch", "resnet18"))
    try:  # the record's keys were checked by load_checkpoint (RECORD_TYPES)
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise KamalError(f"{path}: weights do not match its record: {first_line(e)}") from None
    return model.eval(), ckpt
