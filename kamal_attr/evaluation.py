"""Test-split report of a task (a group, or any attribute set): teachers, the label-free
min-entropy choice, component and target nets per attribute, the entropy of correct vs wrong
teacher predictions (the paper's evidence that entropy impurity is a proxy for
correctness), and each net's parameters and MFLOPs."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from . import KamalError
from .celeba import IMAGENET_MEAN, IMAGENET_STD
from .checkpoint import (atomic_write_text, check_output_path, component_dir, load_net,
                         saved_epoch, target_dir)
from .config import RunConfig
from .engine import accuracy_per_head, predict, predict_many
from .losses import entropy_impurity, route_by_entropy
from .models import input_adapter, net_cost
from .pool import Teacher, Task
from .runtime import dataset, eval_loader
from .synthetic import STYLE_LIST, STYLES, read_styles

log = logging.getLogger(__name__)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def _by_style(styles: list[str], ids: list[str], logits: torch.Tensor, entropies: torch.Tensor,
              pick: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Per photo style: each source net's accuracy and mean entropy, the min-entropy
    choice's accuracy and the share of images it routes to each source net."""
    right = logits.argmax(-1) == labels[:, None]  # (N, S)
    out = {}
    for style in sorted(set(styles), key=lambda st: (STYLES + (st,)).index(st)):
        mask = torch.tensor([s == style for s in styles])
        out[style] = {"sources": {i: {"accuracy": right[mask, k].float().mean().item(),
                                      "entropy": entropies[mask, k].mean().item()}
                                  for k, i in enumerate(ids)},
                      "min_entropy": right[mask].gather(1, pick[mask, None]).float().mean().item(),
                      "routed": {i: (pick[mask] == k).float().mean().item() for k, i in enumerate(ids)}}
    return out


def locate_nets(task: Task, cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint of every net of ``task`` that this run's flags name: ``sources``
    (attribute -> [(teacher, path)]), ``components`` (attribute -> path) and ``target``; a
    path is ``None`` for a net never trained. Raises, before anything is written, for an
    epoch that a trained net does not have (listing those it has)."""
    def teacher_path(t: Teacher) -> Path | None:
        if t.spec is None:  # a pool teacher: found as a file
            return t.path
        return saved_epoch(t.path.parent, cfg.source_save_epoch, "--sorce_saveEpoch")

    return {
        "sources": {a: [(t, teacher_path(t)) for t in task.teachers[a]] for a in task.attributes},
        "components": {a: saved_epoch(component_dir(cfg.components_root, task.name, cfg.variant, a),
                                      cfg.component_epochs, "--component_saveEpoch")
                       for a in task.attributes},
        "target": saved_epoch(target_dir(cfg.target_root, task.name, cfg.variant),
                              cfg.target_epochs, "--target_epoch")}


def teachers_that_taught(attribute: str, record: dict[str, Any],
                         teachers: list[tuple[Teacher, Path | None]]) -> list[tuple[Teacher, Path | None]]:
    """Of the ``teachers`` the task names for ``attribute`` now, those its component
    (``record``) learnt from, as its recipe names them: a pool that grew since would add
    teachers that never taught it to the table, its best teacher, the claims and the cost.
    Any difference is said; with no teacher in common (or no names recorded), all of them."""
    learnt = record.get("recipe", {}).get("teachers", {})
    taught = [(t, p) for t, p in teachers if t.name in learnt]
    new = [t.name for t, _ in teachers if t.name not in learnt]
    gone = [name for name in learnt if name not in {t.name for t, _ in teachers}]
    if learnt and (new or gone):
        log.warning("component %s learnt from %s%s%s", attribute, ", ".join(learnt),
                    f"; not counted, as they did not teach it: {', '.join(new)}" if taught and new
                    else "", f"; no longer in the pool: {', '.join(gone)}" if gone else "")
    return taught if learnt and taught else teachers


#: Bins of the entropy histograms of correct and wrong teacher predictions (the paper's
#: supplementary figure), over [0, ln 2].
ENTROPY_BINS = 20


def evaluate_task(task: Task, cfg: RunConfig, split: str = "test",
                  writer: SummaryWriter | None = None, by_style: bool = False) -> dict[str, Any]:
    """Per attribute of ``task``: every teacher's accuracy, the best of them, the
    min-entropy choice among them (per image, no labels), the component and the target net;
    and every net's parameters and MFLOPs per image (``nets``), the target's against the
    sum of its teachers (``cost``). ``by_style`` adds, per photo style of the synthetic
    data, what the teachers and the min-entropy choice get right (the reason selection
    helps, or not).

    Nets whose checkpoint is absent are reported as ``None`` (and logged), never replaced.
    """
    attributes = task.attributes
    device = torch.device(cfg.device)
    test_data = dataset(cfg, split, attributes)
    labels = test_data.labels  # the loader does not shuffle: row n is image n
    styles = None
    if by_style:
        style_of = read_styles(cfg.data_root)
        if style_of is None:
            raise KamalError(f"--by_style needs the synthetic data's {STYLE_LIST} in "
                             f"{cfg.data_root}; real CelebA has no photo styles")
        styles = [style_of.get(f.name, "?") for f in test_data.files]
    nets = locate_nets(task, cfg)
    # every net present, run in one pass below; teachers fed their own input size/normalisation
    models: dict[tuple, torch.nn.Module] = {}
    about: dict[tuple, dict[str, Any]] = {}

    def add(key: tuple, path: Path, kind: str, attribute: str | None = None) -> dict[str, Any]:
        """Load one net into ``models`` (with its size and cost in ``about``); its record."""
        net, rec = load_net(path, kind=kind, attribute=attribute,
                            image_size=None if kind == "source" else cfg.image_size)
        models[key] = torch.nn.Sequential(
            input_adapter(rec, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD), net)
        about[key] = {"path": str(path), "arch": net.arch, "width": net.width,
                      "image_size": rec["image_size"], **net_cost(net, rec["image_size"])}
        return rec

    if nets["target"] is not None:
        heads = add(("target",), nets["target"], "target")["attributes"]
        missing = [a for a in attributes if a not in heads]
        if missing:
            raise KamalError(f"{nets['target']}: the target net has no head for "
                             f"{', '.join(missing)} (its heads: {', '.join(heads)}); name the "
                             "attributes it was trained for")
    else:
        log.warning("no target net in %s", target_dir(cfg.target_root, task.name, cfg.variant))
    for attribute in attributes:
        path = nets["components"][attribute]
        if path is None:
            log.warning("no component net in %s",
                        component_dir(cfg.components_root, task.name, cfg.variant, attribute))
        else:
            record = add(("component", attribute), path, "component", attribute)
            nets["sources"][attribute] = teachers_that_taught(attribute, record,
                                                              nets["sources"][attribute])
        for teacher, path in nets["sources"][attribute]:
            if path is None:
                log.warning("no source net in %s", teacher.path.parent)
            elif ("source", teacher.name) not in models:
                add(("source", teacher.name), path, "source", attribute)
    outputs, _ = predict_many(list(models.values()), eval_loader(cfg, test_data), device,
                              desc=f"evaluating {len(models)} nets")  # float32: the reported figures
    logits_of = dict(zip(models, outputs))
    target_logits = logits_of.get(("target",))  # its heads matched by name, in any order
    target_heads = models["target",][1].attributes if target_logits is not None else []
    result: dict[str, Any] = {"group": task.name, "split": split, "variant": cfg.variant,
                              "attributes": {}}
    correct_h, wrong_h = [], []
    for j, attribute in enumerate(attributes):
        row: dict[str, Any] = {"sources": {}}
        ids, logits, entropies = [], [], []
        for teacher, _ in nets["sources"][attribute]:
            if ("source", teacher.name) not in models:
                row["sources"][teacher.key] = None
                continue
            net = models["source", teacher.name][1]
            z = logits_of["source", teacher.name][:, net.attributes.index(attribute)]
            h = entropy_impurity(z)
            right = z.argmax(-1) == labels[:, j]
            correct_h.append(h[right])
            wrong_h.append(h[~right])
            if writer is not None:
                tag = teacher.name.replace("/", "__")
                for kind, values in (("correct", h[right]), ("wrong", h[~right])):
                    if len(values):  # a teacher right (or wrong) on every image has no other
                        writer.add_histogram(f"entropy/{attribute}/{tag}/{kind}", values, 0)
            row["sources"][teacher.key] = _accuracy(z, labels[:, j])
            ids.append(teacher.key)
            logits.append(z)
            entropies.append(h)
        accs = [a for a in row["sources"].values() if a is not None]
        row["best_source"] = max(accs) if accs else None
        if logits:
            logits, entropies = torch.stack(logits, 1), torch.stack(entropies, 1)
            pick = route_by_entropy(entropies)
            chosen = logits[torch.arange(len(pick)), pick]
            row["min_entropy"] = _accuracy(chosen, labels[:, j])
            if styles is not None:
                row["by_style"] = _by_style(styles, ids, logits, entropies, pick, labels[:, j])
        else:
            row["min_entropy"] = None
        component_logits = logits_of.get(("component", attribute))
        row["component"] = (None if component_logits is None
                            else _accuracy(component_logits[:, 0], labels[:, j]))
        row["target"] = (None if target_logits is None else
                         _accuracy(target_logits[:, target_heads.index(attribute)], labels[:, j]))
        result["attributes"][attribute] = row
    rows = result["attributes"].values()
    result["mean"] = {}
    for key in ("best_source", "min_entropy", "component", "target"):
        values = [r[key] for r in rows]
        result["mean"][key] = None if None in values else sum(values) / len(values)
    all_sources = [a for r in rows for a in r["sources"].values() if a is not None]
    result["mean"]["sources"] = sum(all_sources) / len(all_sources) if all_sources else None
    if correct_h:
        c, w = torch.cat(correct_h), torch.cat(wrong_h)
        edges = torch.linspace(0, math.log(2), ENTROPY_BINS + 1)  # a 2-way softmax: H <= ln 2
        result["entropy"] = {"correct": c.mean().item() if len(c) else None,
                             "wrong": w.mean().item() if len(w) else None,
                             "num_correct": len(c), "num_wrong": len(w),
                             "histogram": {"edges": edges.tolist(),
                                           "correct": torch.histc(c, ENTROPY_BINS, 0, math.log(2)).tolist(),
                                           "wrong": torch.histc(w, ENTROPY_BINS, 0, math.log(2)).tolist()}}
    keys = {t.name: t.key for t in task.all_teachers()}
    order = ([k for k in [("target",)] + [("component", a) for a in attributes] if k in about]
             + sorted((k for k in about if k[0] == "source"), key=lambda k: int(keys[k[1]])))
    result["nets"] = {("target" if k[0] == "target" else f"{k[0]} {keys.get(k[1], k[1])}"):
                      {**about[k], **({"name": k[1]} if k[0] == "source" else {})} for k in order}
    teachers = [v for k, v in about.items() if k[0] == "source"]
    if ("target",) in about and teachers:
        result["cost"] = {"target": {m: about["target",][m] for m in ("params", "mflops")},
                          "teachers_sum": {m: sum(t[m] for t in teachers) for m in ("params", "mflops")},
                          "num_teachers": len(teachers)}
    return result


#: METHOD.md's claim 3: the target stays "close to" its components; read as within 1 point.
TARGET_TOLERANCE = 0.01


def check_claims(result: dict[str, Any]) -> dict[str, Any]:
    """The paper's claims 1-3 (METHOD.md) on :func:`evaluate_task`'s result.

    Per attribute, differences in accuracy (fractions): ``component - best_source`` (claim 2:
    >= 0), ``target - best_source`` (claim 3a: >= 0) and ``target - component`` (claim 3b:
    >= -TARGET_TOLERANCE); claim 1 compares the mean entropy of correct and wrong teacher
    predictions. A claim whose nets are missing is ``None``.
    """
    rows = result["attributes"]

    def per_attribute(a: str, b: str, floor: float) -> dict[str, Any] | None:
        if any(r[a] is None or r[b] is None for r in rows.values()):
            return None
        gaps = {name: r[a] - r[b] for name, r in rows.items()}
        return {"gaps": gaps, "holds": sum(g >= floor - 1e-9 for g in gaps.values()),
                "of": len(gaps)}

    e = result.get("entropy", {})
    entropy = (None if e.get("correct") is None or e.get("wrong") is None
               else {"correct": e["correct"], "wrong": e["wrong"], "holds": e["correct"] < e["wrong"]})
    return {"1_entropy_lower_when_correct": entropy,
            "2_component_vs_best_source": per_attribute("component", "best_source", 0.0),
            "3_target_vs_best_source": per_attribute("target", "best_source", 0.0),
            "3_target_vs_component": per_attribute("target", "component", -TARGET_TOLERANCE)}


def format_claims(claims: dict[str, Any]) -> str:
    """One line per claim: how many attributes it holds for and the gaps in points."""
    def line(title: str, c: dict[str, Any] | None) -> str:
        if c is None:
            return f"  {title}: not measured (nets missing)"
        gaps = ", ".join(f"{k} {100 * v:+.2f}" for k, v in c["gaps"].items())
        return f"  {title}: {c['holds']}/{c['of']} attributes ({gaps})"

    e = claims["1_entropy_lower_when_correct"]
    first = ("  1 entropy lower when a teacher is right: not measured" if e is None else
             f"  1 entropy lower when a teacher is right: {'holds' if e['holds'] else 'FAILS'} "
             f"({e['correct']:.3f} vs {e['wrong']:.3f} nats)")
    return "\n".join([
        "the paper's claims on this split (points):", first,
        line("2 component >= best source net", claims["2_component_vs_best_source"]),
        line("3 target >= best source net", claims["3_target_vs_best_source"]),
        line(f"3 target within {100 * TARGET_TOLERANCE:.0f} point of its component",
             claims["3_target_vs_component"])])


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """An aligned text table of :func:`evaluate_task`'s result (accuracies in %)."""
    header = ["attribute", "sources", "best src", "min-H src", "component", "target"]
    lines = []
    for attribute, r in result["attributes"].items():
        sources = " ".join(f"{k}:{_pct(v)}" for k, v in r["sources"].items())
        lines.append([attribute, sources, _pct(r["best_source"]), _pct(r["min_entropy"]),
                      _pct(r["component"]), _pct(r["target"])])
    m = result["mean"]
    lines.append(["mean", f"all:{_pct(m['sources'])}", _pct(m["best_source"]),
                  _pct(m["min_entropy"]), _pct(m["component"]), _pct(m["target"])])
    widths = [max(len(str(row[k])) for row in [header] + lines) for k in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) if k < 2 else str(c).rjust(w)  # noqa: E731
                                for k, (c, w) in enumerate(zip(row, widths)))
    out = [f"{result['group']} group, {result['split']} split, {result['variant']} "
           "(accuracy %)", fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(row) for row in lines]
    if "entropy" in result:
        e = result["entropy"]
        fmt_h = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        out.append(f"teacher entropy (nats): correct {fmt_h(e['correct'])} "
                   f"(n={e['num_correct']}), wrong {fmt_h(e['wrong'])} (n={e['num_wrong']})")
    return "\n".join(out)


def format_cost(result: dict[str, Any]) -> str:
    """Every net's architecture, width, input size, parameters and MFLOPs per image, and the
    target's against the sum of its teachers (what the student saves)."""
    rows = [[label, n.get("name", ""), f"{n['arch']} w{n['width']} {n['image_size']}px",
             f"{n['params'] / 1e6:.2f}M", f"{n['mflops']:.1f}"] for label, n in result["nets"].items()]
    if not rows:
        return ""
    header = ["net", "", "architecture", "params", "MFLOPs"]
    widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
    out = ["nets (parameters; MFLOPs per image at its input size, torch.utils.flop_counter):"]
    out += ["  " + "  ".join(c.ljust(w) if k < 3 else c.rjust(w)
                             for k, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header] + rows]
    if "cost" in result:
        c = result["cost"]
        t, s = c["target"], c["teachers_sum"]
        out.append(f"target vs its {c['num_teachers']} teachers together: "
                   f"{t['params'] / 1e6:.2f}M vs {s['params'] / 1e6:.2f}M parameters "
                   f"({t['params'] / s['params']:.2f}x), {t['mflops']:.1f} vs {s['mflops']:.1f} "
                   f"MFLOPs ({t['mflops'] / s['mflops']:.2f}x)")
    return "\n".join(out)


def format_by_style(result: dict[str, Any]) -> str:
    """Per attribute, one row per source net (accuracy % / mean entropy per style) and one for
    the min-entropy choice (accuracy % and the share routed to each source net)."""
    out = []
    for attribute, r in result["attributes"].items():
        table = r.get("by_style")
        if not table:
            continue
        styles = list(table)
        rows = [[f"source {i}"] + [f"{100 * table[st]['sources'][i]['accuracy']:.1f} / "
                                   f"{table[st]['sources'][i]['entropy']:.2f}" for st in styles]
                for i in r["sources"] if r["sources"][i] is not None]
        rows.append(["min-H"] + [f"{100 * table[st]['min_entropy']:.1f} (" + " ".join(
            f"{i}:{100 * v:.0f}%" for i, v in table[st]["routed"].items()) + ")" for st in styles])
        header = [attribute] + styles
        widths = [max(len(row[k]) for row in [header] + rows) for k in range(len(header))]
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    if out:
        out.insert(0, "by photo style: source nets' accuracy % / mean entropy (nats); "
                      "min-H: accuracy % (share routed to each source net)")
    return "\n".join(out)


def demo_result_path(cfg: RunConfig, task_name: str) -> Path:
    """Where the demo of ``train.py`` (and the report's runs) write their evaluation."""
    return cfg.log_dir / f"evaluate_{task_name}_{cfg.variant}.json"


def report_task(task: Task, cfg: RunConfig, split: str = "test",
                json_path: Path | None = None, by_style: bool = False,
                json_flag: str | None = "--json") -> dict[str, Any]:
    """Evaluate ``task`` (histograms to ``log_dir/evaluate/...``), print the table and
    optionally write the JSON (``json_flag``: the option that named its path, for errors);
    what ``evaluate.py`` and the demo of ``train.py`` print."""
    with SummaryWriter(str(cfg.log_dir / "evaluate" / task.name / cfg.variant)) as writer:
        result = evaluate_task(task, cfg, split, writer, by_style)
    result["claims"] = check_claims(result)
    print(format_table(result))
    print(format_claims(result["claims"]))
    print(format_cost(result))
    if by_style:
        print(format_by_style(result))
    if json_path is not None:
        write_result(json_path, result, json_flag)
    return result


#: Keys that mark a JSON file as a result of ``evaluate.py`` (a task's, as every version
#: wrote it, or one checkpoint's).
RESULT_KEYS = ({"group", "split", "variant", "attributes"}, {"checkpoint", "split", "accuracy"})


def check_result_path(path: Path, flag: str | None = "--json") -> None:
    """Refuse to write a result over an existing file unless it is a result this project
    wrote (an earlier run's, which a rerun replaces): nothing else is ever overwritten.
    ``flag``: the option that named ``path``, for the hint (``None``: a path of our own).
    Also stops if ``path`` could not be written (:func:`check_output_path`)."""
    check_output_path(path, flag)
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
        ours = isinstance(old, dict) and any(keys <= old.keys() for keys in RESULT_KEYS)
    except (OSError, ValueError):
        ours = False
    if not ours:
        hint = f"pass another {flag}" if flag else "move it away, then rerun"
        raise KamalError(f"{path} exists and is not an evaluation result of this project; it is "
                         f"never overwritten: {hint}")


def write_result(path: Path, result: dict[str, Any], flag: str | None = "--json") -> None:
    """Write a result as JSON to ``path`` (:func:`check_result_path` first), atomically."""
    check_result_path(path, flag)
    atomic_write_text(path, json.dumps(result, indent=2))
    print(f"(written to {path})")


def evaluate_checkpoint(path: Path, cfg: RunConfig, split: str = "test") -> dict[str, dict[str, float]]:
    """Per attribute of any checkpoint this project wrote, on ``split``: its ``accuracy`` and
    the ``majority`` baseline (always answering the split's more frequent label)."""
    device = torch.device(cfg.device)
    net, _ = load_net(path, image_size=cfg.image_size)
    data = eval_loader(cfg, dataset(cfg, split, net.attributes))
    logits, labels = predict(net, data, device, desc=path.name)
    accuracy = accuracy_per_head(logits, labels, net.attributes)
    positive = labels.float().mean(0)
    return {a: {"accuracy": accuracy[a], "majority": max(positive[k].item(), 1 - positive[k].item())}
            for k, a in enumerate(net.attributes)}
