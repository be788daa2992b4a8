"""Amalgamation tasks and the teacher pool: which teachers teach which attribute.

A :class:`Task` names the target net's attributes (its heads, in order), the folder its
nets live in, and for every attribute the teachers that have a head for it. The paper's
three groups are *presets*: their teachers are METHOD.md's table, each serving its first
attribute, and their folders are the group's name. Any other attribute set
(``train.py --attributes ... --name ...``) takes its teachers from the *pool*: every
source-net checkpoint under ``--sourcenets_root``, at any depth and of any architecture,
each serving **every** attribute it has a head for.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import KamalError
from .attributes import (CELEBA_ATTRIBUTES, GROUPS, SOURCE_NETS, SourceNetSpec, check_attribute,
                         check_group, source_net, source_nets_of)
from .checkpoint import (available_epochs, epoch_file, is_epoch_file, load_checkpoint,
                         source_dir)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Teacher:
    """One teacher of a task: ``key`` is its id in tables (a preset's source id, else its
    number in the pool), ``name`` is unique (recipes and routing lists), ``path`` its
    checkpoint, ``spec`` the table entry that makes it (presets)."""

    key: str
    name: str
    path: Path
    spec: SourceNetSpec | None = None


@dataclass(frozen=True)
class Task:
    """What one ``train.py`` run amalgamates: ``attributes`` (the target's heads, in order),
    ``teachers[a]`` (who teaches attribute ``a``), and ``name`` (its folders)."""

    name: str
    attributes: tuple[str, ...]
    teachers: dict[str, tuple[Teacher, ...]]
    preset: bool

    def all_teachers(self) -> list[Teacher]:
        """Every teacher once, in the order they first appear."""
        seen: dict[str, Teacher] = {}
        for teachers in self.teachers.values():
            for t in teachers:
                seen.setdefault(t.name, t)
        return list(seen.values())

    def routing_folder(self, root: Path, selection: str, attribute: str) -> Path:
        """Where the routing lists of ``attribute`` go: one list per teacher. A preset's
        teachers serve one attribute each (the seed's layout, ``{group}/{selection}``);
        a pool teacher may serve several, so its lists are kept per attribute."""
        folder = root / self.name / selection
        return folder if self.preset else folder / attribute


def routing_list_name(teacher: str) -> str:
    """The file name of a teacher's routing list (``--sourcedata_txtroot``): its pool name,
    flattened (``hair/source1_Black_Hair`` -> ``hair__source1_Black_Hair.txt``)."""
    return teacher.replace("/", "__") + ".txt"


def preset_task(group: str, save_epoch: int, sources_root: Path) -> Task:
    """A group of METHOD.md: its component attributes and its table's source nets (epoch
    ``save_epoch``; a path may not exist yet)."""
    teachers = {a: tuple(Teacher(str(s.source_id), s.name,
                                 epoch_file(source_dir(sources_root, s), save_epoch), s)
                         for s in source_nets_of(group, a)) for a in GROUPS[group]}
    return Task(group, GROUPS[group], teachers, preset=True)


@dataclass(frozen=True)
class PoolEntry:
    """A source-net checkpoint found under the pool's root, with its record (no weights)."""

    name: str
    path: Path
    record: dict[str, Any]

    @property
    def attributes(self) -> list[str]:
        return self.record["attributes"]


def _candidates(root: Path, save_epoch: int) -> tuple[list[tuple[str, Path]], list[str]]:
    """``(name, file)`` for each net under ``root``, and notes on what was passed over.

    A folder of ``epoch_NNN.pth`` files (a net trained by this project; named by its path
    under ``root``) gives epoch ``save_epoch`` if it has it, else its last epoch once the
    net has finished (no ``last.pth`` of an unfinished run); any other ``.pth`` file is a
    candidate of its own (a downloaded teacher; named by its path, suffix included, so a
    file ``x.pth`` and a folder ``x/`` differ). ``last.pth`` is never a candidate.
    """
    found, notes = [], []
    folders = sorted({p.parent for p in root.rglob("epoch_*.pth")})
    for folder in folders:
        name = folder.name if folder == root else folder.relative_to(root).as_posix()
        epochs = available_epochs(folder)
        if not epochs:  # only names such as epoch_best.pth: files of their own, below
            continue
        chosen = epoch_file(folder, save_epoch)
        if not chosen.exists():
            if (folder / "last.pth").exists():
                try:
                    last = load_checkpoint(folder / "last.pth", mmap=True)
                except KamalError as e:
                    notes.append(f"{name}: passed over, {e}")
                    continue
                if last.get("epoch", 0) < last.get("recipe", {}).get("epochs", 0):
                    notes.append(f"{name}: still training (epochs {', '.join(map(str, epochs))})")
                    continue
            chosen = epoch_file(folder, epochs[-1])
        found.append((name, chosen))
    for path in sorted(root.rglob("*.pth")):
        if path.name == "last.pth" or is_epoch_file(path):
            continue  # a net's own files: chosen above
        found.append((path.relative_to(root).as_posix(), path))
    return found, notes


def discover_pool(root: Path, save_epoch: int) -> tuple[list[PoolEntry], list[str]]:
    """Every source net under ``root`` (see :func:`_candidates`), read with
    ``weights_only``; files that are no checkpoint of this project, or not of a source net,
    are passed over with a note. Returns ``(entries by name, notes)``."""
    if not root.is_dir():
        return [], [f"{root} does not exist"]
    candidates, notes = _candidates(root, save_epoch)
    entries = []
    for name, path in candidates:
        try:
            ckpt = load_checkpoint(path, mmap=True)  # the record; weights stay on disk
        except KamalError as e:
            notes.append(f"{name}: passed over, {e}")
            continue
        if ckpt.get("kind") != "source":
            notes.append(f"{name}: passed over, a {ckpt.get('kind')} net, not a source net")
            continue
        record = {k: v for k, v in ckpt.items() if k not in ("model", "method", "optimizer",
                                                              "scheduler")}
        entries.append(PoolEntry(name, path, record))
    return entries, notes


def coverage(entries: Sequence[PoolEntry]) -> dict[str, int]:
    """Attribute -> number of pool teachers with a head for it."""
    counts: dict[str, int] = {}
    for e in entries:
        for a in e.attributes:
            counts[a] = counts.get(a, 0) + 1
    return dict(sorted(counts.items()))


def default_name(attributes: Sequence[str]) -> str:
    """A task's folder name from its attributes: joined when short, else a hash of them."""
    joined = "-".join(attributes)
    if len(joined) <= 60:
        return joined
    return f"custom{len(attributes)}-" + hashlib.sha256(joined.encode()).hexdigest()[:8]


def check_folder_name(name: str) -> str:
    """``--name`` becomes a folder: a plain name, never a path that leaves its root."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise KamalError(f"--name {name!r} must be a plain folder name")
    return name


def check_task_name(name: str) -> str:
    if name in GROUPS:
        raise KamalError(f"--name {name} is a preset group's folder; pass --target_attribute "
                         f"{name} for the preset, or another --name")
    return check_folder_name(name)


def pool_task(name: str, attributes: Sequence[str], root: Path, save_epoch: int,
              need_teachers: bool = True) -> Task:
    """A task whose attribute ``a`` is taught by every pool teacher with a head for ``a``.

    Raises, before anything is trained, when an attribute has no teacher (unless
    ``need_teachers`` is false: stage 2 learns from the components alone), with one line
    listing the uncovered attributes and what the pool covers. Files passed over are
    logged, one warning each (as ``--list_pool`` lists them)."""
    entries, notes = discover_pool(root, save_epoch)
    for note in notes:
        log.warning("teacher pool: %s", note)
    used = [e for e in entries if set(e.attributes) & set(attributes)]
    keys = {e.name: str(k) for k, e in enumerate(used, start=1)}
    teachers = {a: tuple(Teacher(keys[e.name], e.name, e.path) for e in used if a in e.attributes)
                for a in attributes}
    flat = [routing_list_name(e.name) for e in used]
    clash = sorted({n for n in flat if flat.count(n) > 1})
    if clash:
        raise KamalError(f"teachers under {root} whose routing lists would share a name "
                         f"({', '.join(clash)}): rename one of their folders")
    uncovered = [a for a in attributes if not teachers[a]]
    if uncovered and need_teachers:
        have = ", ".join(f"{a} ({n})" for a, n in coverage(entries).items()) or "nothing"
        raise KamalError(f"no teacher in the pool covers {', '.join(uncovered)}; the pool "
                         f"({len(entries)} source nets under {root}) covers: {have}. Train one "
                         "with: python train_sourcenet.py --attributes ... --name ...")
    return Task(name, tuple(attributes), teachers, preset=False)


def format_pool(entries: Sequence[PoolEntry], notes: Sequence[str], root: Path) -> str:
    """The pool as a table: net, architecture, width, input size, epoch, and each
    attribute's val accuracy; then each attribute's number of teachers."""
    rows = [["net", "arch", "width", "px", "epoch", "attributes (val accuracy %)"]]
    for e in entries:
        r, acc = e.record, e.record.get("val_accuracy") or {}
        heads = " ".join(f"{a}" + (f":{100 * acc[a]:.1f}" if a in acc else "") for a in e.attributes)
        rows.append([e.name, r.get("arch", "resnet18"), str(r["width"]), str(r["image_size"]),
                     str(r["epoch"]), heads])
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]) - 1)]
    lines = [f"teacher pool: {len(entries)} source nets under {root}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.append("coverage: " + (", ".join(f"{a} {n}" for a, n in coverage(entries).items())
                                 or "none"))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def select_source_nets(target_attribute: str | None, source_id: int | None, all_nets: bool,
                       group: str | None, attributes: Sequence[str] | None,
                       name: str | None) -> list[SourceNetSpec]:
    """The nets ``train_sourcenet.py``'s flags name: one of the table (``--target_attribute``,
    ``--source_id``), all of them (``--all``, ``--group``) or one on any ``--attributes``
    (``--name``). Flags of one way mixed with another's are refused, not silently ignored."""
    one = [flag for flag, value in (("--target_attribute", target_attribute),
                                    ("--source_id", source_id)) if value is not None]
    if attributes and (one or all_nets or group):
        extra = one + ["--all"] * all_nets + ["--group"] * bool(group)
        raise KamalError(f"--attributes trains one net on the attributes it names: drop {', '.join(extra)}")
    if name is not None and not attributes:
        raise KamalError(f"--name {name} names an --attributes net: add --attributes, or drop --name")
    if all_nets and one:
        raise KamalError(f"--all trains every source net (of --group): drop {', '.join(one)}")
    if group and not all_nets:
        raise KamalError(f"--group {group} picks the nets of --all: add --all, or name one net "
                         "with --target_attribute and --source_id")
    if attributes:
        names = CELEBA_ATTRIBUTES if list(attributes) == ["all"] else checked_attributes(attributes)
        return [SourceNetSpec("custom", 0, tuple(names), label=check_folder_name(name or "custom"))]
    if all_nets:
        return list(source_nets_of(group) if group else SOURCE_NETS)
    return [source_net(check_attribute(target_attribute or "Black_Hair"), source_id or 1)]


def check_task_flags(group: str | None, attributes: Sequence[str] | None) -> str:
    """The preset group the flags name (``hair`` if none), after refusing ``--target_attribute``
    together with ``--attributes``: they name two different tasks."""
    if group and attributes:
        raise KamalError(f"--target_attribute {group} and --attributes {' '.join(attributes)} "
                         "name two different tasks: pass one of them")
    return group or "hair"


def select_task(group: str | None, attributes: Sequence[str] | None, name: str | None,
                sources_root: Path, save_epoch: int, need_teachers: bool = True) -> Task:
    """The task a script's flags name: ``--attributes`` (with ``--name``) from the pool,
    else the preset ``--target_attribute`` group (scripts refuse both first:
    :func:`check_task_flags`)."""
    if attributes:
        attributes, name = named_attributes(attributes, name)
        return pool_task(name, attributes, sources_root, save_epoch, need_teachers)
    if name:
        raise KamalError(f"--name {name} names an --attributes task; a group's folders are its "
                         "name (--target_attribute)")
    return preset_task(check_group(group or "hair"), save_epoch, sources_root)


def checked_attributes(attributes: Sequence[str]) -> tuple[str, ...]:
    """``--attributes`` checked (one line for an unknown name) and without repeats."""
    return tuple(dict.fromkeys(check_attribute(a) for a in attributes))


def named_attributes(attributes: Sequence[str], name: str | None) -> tuple[tuple[str, ...], str]:
    """``--attributes`` checked and without repeats, and the task's checked ``--name``."""
    attributes = checked_attributes(attributes)
    return attributes, check_task_name(name or default_name(attributes))


def demo_teachers(attributes: Sequence[str], name: str) -> list[tuple[SourceNetSpec, str]]:
    """The teachers the demo makes for an attribute set, as ``(spec, arch)``: every
    net of METHOD.md's table with a head for one of them (ResNet-18 specialists, each on its
    table part of the training split), and one ResNet-34 generalist on all of them, trained
    on the whole split (so that every attribute, also one of no table net, has a teacher):
    a pool of mixed architectures."""
    wanted = set(attributes)
    table = [(s, "resnet18") for s in SOURCE_NETS if wanted & set(s.attributes)]
    mixed = SourceNetSpec("custom", 0, tuple(attributes), label=f"{name}_resnet34")
    return table + [(mixed, "resnet34")]
