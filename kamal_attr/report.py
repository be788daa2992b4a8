"""One command, one report: every group over several seeds, the ablations, and figures.

    python -m kamal_attr.report --demo --seeds 3        # writes results/

For each seed (3256, 3257, ...) and each group it runs, or reuses, the demo of ``train.py``
(teachers, components, target; the first seed's nets are the plain demo's), then for the
hair group the ablations (``--selection average|random``, ``--no_feature_loss``,
``--no_penalty``). It writes ``results/report.md`` (what held and what did not, with the
smallest margins), ``results/report.json`` (every evaluation it was made from) and PNG
figures. matplotlib is imported here only: training never needs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Collection, Sequence

import torch

from . import KamalError
from .attributes import GROUPS
from .checkpoint import atomic_write_text, check_output_path, component_dir, load_checkpoint
from .cli import ArgumentParser, refuse_ignored, run
from .config import REPO_ROOT, amalgamation_parser, resolve_config
from .distributed import rank_and_world
from .evaluation import check_result_path, demo_result_path, evaluate_task, report_task
from .models import TAP_LAYERS
from .runtime import ensure_data, start
from .stages import amalgamate

log = logging.getLogger("kamal_attr")

#: The ablations of METHOD.md's claim 4 and the penalty's, as train.py flags.
ABLATIONS: dict[str, list[str]] = {
    "average": ["--selection", "average"],
    "random": ["--selection", "random"],
    "logits only": ["--no_feature_loss"],
    "no penalty": ["--no_penalty"],
}
#: The margins the report checks (points): component vs the min-entropy choice it learns
#: from, component vs best teacher, target vs its component.
TOLERANCE = {"component_vs_min_entropy": -0.5, "component_vs_best": -0.5, "target_vs_component": -1.0}


def seed_flags(seed: int, first: int) -> list[str]:
    """``train.py`` flags of one seed: the first seed's nets are the plain demo's; the
    others get folders of their own (their recipes differ, so they cannot share)."""
    if seed == first:
        return ["--seed", str(seed)]
    sub = f"seed{seed}"
    return ["--seed", str(seed), "--sourcenets_root", f"snapshot/demo/{sub}/sources",
            "--componentnets_root", f"snapshot/demo/{sub}/components",
            "--target_root", f"snapshot/demo/{sub}/target",
            "--sourcedata_txtroot", f"data/demo/{sub}/sources", "--log_dir", f"run/demo/{sub}"]


def run_demo(flags: list[str], group: str, fit: bool = False) -> tuple[dict[str, Any], Any]:
    """Train (or reuse) one group's demo nets under ``flags`` and evaluate them on the test
    split (the table is printed); returns the evaluation and the run's config. With ``fit``
    the evaluation also holds ``train_split``: the same accuracies on the training images the
    nets learnt from (eval view), which tell under-fitting from poor generalisation."""
    cfg = resolve_config(amalgamation_parser().parse_args(["--demo", "--target_attribute", group] + flags))
    check_result_path(demo_result_path(cfg, group), flag=None)  # before training, not after
    start(cfg)
    ensure_data(cfg)
    task = amalgamate(cfg, group)
    result = report_task(task, cfg, json_path=demo_result_path(cfg, group), json_flag=None)
    if fit:
        train = evaluate_task(task, cfg, split="train")
        result["train_split"] = {a: {k: r[k] for k in ("best_source", "min_entropy", "component", "target")}
                                 for a, r in train["attributes"].items()}
    return result, cfg


def bridge_curves(cfg: Any, group: str) -> dict[str, list[float]]:
    """Per component of ``group``: the source-side bridges' output RMS (mean over the taps)
    after each epoch, from the component checkpoints' history."""
    curves = {}
    for attribute in GROUPS[group]:
        last = component_dir(cfg.components_root, group, cfg.variant, attribute) / "last.pth"
        history = load_checkpoint(last, mmap=True).get("history", []) if last.exists() else []
        keys = [f"bridge_rms/source/{tap}" for tap in TAP_LAYERS]
        curves[attribute] = [statistics.mean(h[k] for k in keys) for h in history if keys[0] in h]
    return curves


def row_margins(r: dict[str, float]) -> dict[str, float]:
    """One attribute's row, in points: component − min-entropy choice, component − best
    teacher, target − component, target − best teacher."""
    return {"component_vs_min_entropy": 100 * (r["component"] - r["min_entropy"]),
            "component_vs_best": 100 * (r["component"] - r["best_source"]),
            "target_vs_component": 100 * (r["target"] - r["component"]),
            "target_vs_best": 100 * (r["target"] - r["best_source"])}


def margins(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """:func:`row_margins` of every attribute of an evaluation."""
    return {attribute: row_margins(r) for attribute, r in result["attributes"].items()}


def held(points: float, key: str) -> bool:
    """Whether a margin (points) of check ``key`` holds: at or above its floor (0 for the
    strict target ≥ best teacher check), with rounding slack."""
    return points >= TOLERANCE.get(key, 0.0) - 1e-9


def explain(test: dict[str, float], train: dict[str, float] | None) -> list[str]:
    """Why an attribute run missed one of the :data:`TOLERANCE` margins, from its test-split
    row and (when measured) its training-split row (accuracy against the labels on the
    images the nets learnt from, eval view); empty when all three held.

    A component's miss against the best teacher splits into its min-entropy choice against
    that teacher (below it: the method's limit, a copy cannot do better) and the component
    against its choice. A net below its own teacher (component vs choice, target vs
    component) is *under-fitting* where it misses the margin on the training images too,
    plus what it loses from those to unseen images; where it holds there, it generalises worse.
    """
    m = row_margins(test)
    why = []
    if not held(m["component_vs_best"], "component_vs_best"):
        choice = 100 * (test["min_entropy"] - test["best_source"])
        limit = " (the method's limit)" if not held(choice, "component_vs_best") else ""
        rest = ("" if not held(m["component_vs_min_entropy"], "component_vs_min_entropy")
                else f", the component {m['component_vs_min_entropy']:+.2f} vs its choice")  # else: next line
        why.append(f"the component is {m['component_vs_best']:+.2f} vs the best teacher: its "
                   f"min-entropy choice {choice:+.2f} vs that teacher{limit}{rest}")
    fit = row_margins(train) if train is not None else None
    for key, who, signal in (("component_vs_min_entropy", "component", "its min-entropy choice"),
                             ("target_vs_component", "target", "its component")):
        if held(m[key], key):
            continue
        line = f"the {who} is {m[key]:+.2f} vs {signal}"
        if fit is not None:
            lost = m[key] - fit[key]
            line += (f": {fit[key]:+.2f} already on the training images it learnt from "
                     f"(under-fitting), {lost:+.2f} more on unseen images"
                     if not held(fit[key], key) else
                     f", but {fit[key]:+.2f} on the training images it learnt from: it generalises worse")
        why.append(line)
    return why


def shortfalls(runs: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One markdown line per attribute run that missed a :data:`TOLERANCE` margin, with
    :func:`explain`'s causes (seeds are JSON keys: strings)."""
    lines = []
    for group, by_seed in runs.items():
        for seed, result in by_seed.items():
            fit = result.get("train_split", {})
            for attribute, row in result["attributes"].items():
                why = explain(row, fit.get(attribute))
                if why:
                    lines.append(f"- {group} {attribute}, seed {seed}: " + "; ".join(why) + ".")
    return lines


def spread(values: Sequence[float]) -> str:
    """``mean ± half the range`` of ``values`` (points)."""
    return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def summarise(runs: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The report's verdict, one markdown line per group and check, with the smallest
    margin and where it is."""
    lines = []
    for group, by_seed in runs.items():
        checks: dict[str, list[tuple[float, str]]] = {k: [] for k in (*TOLERANCE, "target_vs_best")}
        entropy_holds = []
        for seed, result in by_seed.items():
            for attribute, m in margins(result).items():
                for k, v in m.items():
                    checks[k].append((v, f"{attribute}, seed {seed}"))
            claim1 = result["claims"]["1_entropy_lower_when_correct"]
            entropy_holds.append(claim1 is not None and claim1["holds"])
        n = len(checks["component_vs_best"])
        lines.append(f"- **{group}**: claim 1 (entropy lower when a teacher is right) holds for "
                     f"{sum(entropy_holds)} of {len(entropy_holds)} seeds.")
        names = {"component_vs_min_entropy": "component ≥ its min-entropy choice − 0.5",
                 "component_vs_best": "component ≥ best teacher − 0.5 (claim 2, with the issue's tolerance)",
                 "target_vs_component": "target within 1 point of its component (claim 3)",
                 "target_vs_best": "target ≥ best teacher (claim 3, strict)"}
        for k, name in names.items():
            count = sum(held(v, k) for v, _ in checks[k])
            worst, where = min(checks[k])
            lines.append(f"  - {name}: **{count}/{n}** attribute runs; smallest margin "
                         f"{worst:+.2f} ({where})")
    return lines


def figures(report: dict[str, Any], out: Path) -> list[str]:
    """The PNGs of the report; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    runs = report["runs"]
    first = str(report["seeds"][0])
    # entropy of correct vs wrong teacher predictions (the paper's supplementary figure)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (group, by_seed) in zip(axes[0], runs.items()):
        h = by_seed[first]["entropy"]["histogram"]
        centres = [(a + b) / 2 for a, b in zip(h["edges"], h["edges"][1:])]
        width = h["edges"][1] - h["edges"][0]
        for key, colour in (("correct", "tab:green"), ("wrong", "tab:red")):
            total = sum(h[key]) or 1
            ax.bar(centres, [c / total for c in h[key]], width=width, alpha=0.6, color=colour,
                   label=f"{key} (n={int(sum(h[key]))})")
        ax.set(title=f"{group}: teacher entropy", xlabel="entropy impurity (nats)",
               ylabel="share of predictions")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "entropy_histograms.png", dpi=110)
    names.append("entropy_histograms.png")
    plt.close(fig)
    # accuracy per attribute: best teacher, min-entropy choice, component, target
    keys = (("best_source", "best teacher"), ("min_entropy", "min-entropy choice"),
            ("component", "component"), ("target", "target"))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 3.4), squeeze=False)
    for ax, (group, by_seed) in zip(axes[0], runs.items()):
        attributes = list(next(iter(by_seed.values()))["attributes"])
        for k, (key, label) in enumerate(keys):
            values = [[100 * r["attributes"][a][key] for r in by_seed.values()] for a in attributes]
            ax.bar([i + (k - 1.5) * 0.2 for i in range(len(attributes))],
                   [statistics.mean(v) for v in values], width=0.2, label=label,
                   yerr=[(max(v) - min(v)) / 2 for v in values], capsize=2)
        ax.set_xticks(range(len(attributes)), [a.replace("_", " ") for a in attributes], fontsize=8)
        low = min(100 * r["attributes"][a][key] for r in by_seed.values() for a in attributes
                  for key, _ in keys)
        ax.set(title=f"{group} (mean ± half range over seeds)", ylabel="test accuracy %",
               ylim=(low - 2, 100))
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    names.append("accuracy.png")
    plt.close(fig)
    if report["ablations"]:
        variants = ["min-entropy (paper)"] + list(report["ablations"])
        comp = [[100 * r["mean"]["component"] for r in report["runs"]["hair"].values()]]
        targ = [[100 * r["mean"]["target"] for r in report["runs"]["hair"].values()]]
        for by_seed in report["ablations"].values():
            comp.append([100 * r["mean"]["component"] for r in by_seed.values()])
            targ.append([100 * r["mean"]["target"] for r in by_seed.values()])
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for k, (values, label) in enumerate(((comp, "components' mean"), (targ, "target's mean"))):
            ax.bar([i + (k - 0.5) * 0.35 for i in range(len(variants))],
                   [statistics.mean(v) for v in values], width=0.35, label=label,
                   yerr=[(max(v) - min(v)) / 2 for v in values], capsize=3)
        ax.set_xticks(range(len(variants)), variants, fontsize=8)
        low = min(min(v) for v in comp + targ)
        ax.set(title="hair: ablations (mean ± half range over seeds)", ylabel="test accuracy %",
               ylim=(low - 2, max(max(v) for v in comp + targ) + 1))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ablations.png", dpi=110)
        names.append("ablations.png")
        plt.close(fig)
    if report["bridge_rms"]:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for (variant, curves), style in zip(report["bridge_rms"].items(), ("-", "--")):
            for attribute, curve in curves.items():
                ax.plot(range(1, len(curve) + 1), curve, style, label=f"{attribute} ({variant})")
        ax.set(title=f"hair, seed {first}: source-side bridge output RMS", xlabel="epoch",
               ylabel="RMS (mean over the 5 taps)", yscale="log")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "bridge_norms.png", dpi=110)
        names.append("bridge_norms.png")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    groups = list(runs)
    for k, (key, label) in enumerate((("target", "target"), ("teachers_sum", "its teachers together"))):
        ax.bar([i + (k - 0.5) * 0.35 for i in range(len(groups))],
               [runs[g][first]["cost"][key]["mflops"] for g in groups], width=0.35, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(title="MFLOPs per image (torch.utils.flop_counter)", ylabel="MFLOPs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    names.append("cost.png")
    plt.close(fig)
    return names


def write_markdown(report: dict[str, Any], pictures: list[str], out: Path) -> Path:
    seeds = report["seeds"]
    lines = ["# Adaptive knowledge amalgamation on the synthetic demo: report", "",
             f"Made by `{report['command']}` in {report['seconds'] / 60:.1f} min "
             f"(torch {report['torch']}; seeds {', '.join(map(str, seeds))}; "
             "accuracies on the 2400 test images, in %; margins in points).", "",
             "## What held", ""]
    lines += summarise(report["runs"])
    misses = shortfalls(report["runs"])
    lines += ["", "## Where and why not", "",
              "Every attribute run below one of the three tolerances above (the strict target ≥ "
              "best teacher check is not broken down). Where the min-entropy choice itself is "
              "below the best teacher, a component that copies it cannot pass the best teacher: "
              "that is the method's limit, not the implementation's. A net below its own teacher "
              "(component vs its choice, target vs its component) is also compared with it on the "
              "training images it learnt from (accuracy against the labels, eval view): below the "
              "margin there too is under-fitting within the demo's schedule; within it there, the "
              "net generalises worse.", ""] + (misses or ["- none"]) + [""]
    for group, by_seed in report["runs"].items():
        lines += [f"## {group}", "", "| attribute | best teacher | min-entropy choice | component | target |",
                  "|---|---|---|---|---|"]
        for attribute in next(iter(by_seed.values()))["attributes"]:
            cells = [spread([100 * r["attributes"][attribute][k] for r in by_seed.values()])
                     for k in ("best_source", "min_entropy", "component", "target")]
            lines.append(f"| {attribute} | " + " | ".join(cells) + " |")
        first = by_seed[str(seeds[0])]
        e = first["entropy"]
        c = first["cost"]
        lines += ["", f"Seed {seeds[0]}: teacher entropy {e['correct']:.3f} nats when right, "
                  f"{e['wrong']:.3f} when wrong. Target: {c['target']['params'] / 1e6:.2f}M "
                  f"parameters and {c['target']['mflops']:.1f} MFLOPs per image, against "
                  f"{c['teachers_sum']['params'] / 1e6:.2f}M and {c['teachers_sum']['mflops']:.1f} "
                  f"for its {c['num_teachers']} teachers together.", ""]
    if report["ablations"]:
        lines += ["## Ablations (hair)", "", "| variant | components' mean | target's mean |",
                  "|---|---|---|"]
        rows = {"min-entropy (paper)": report["runs"]["hair"], **report["ablations"]}
        for variant, by_seed in rows.items():
            lines.append(f"| {variant} | {spread([100 * r['mean']['component'] for r in by_seed.values()])}"
                         f" | {spread([100 * r['mean']['target'] for r in by_seed.values()])} |")
        if report["bridge_rms"]:
            lines += ["", "Source-side bridge output RMS (mean over taps and components) after the "
                      "first and the last epoch, seed " + str(seeds[0]) + ":"]
            for variant, curves in report["bridge_rms"].items():
                firsts = [c[0] for c in curves.values() if c]
                lasts = [c[-1] for c in curves.values() if c]
                if firsts:
                    lines.append(f"- {variant}: {statistics.mean(firsts):.3f} -> {statistics.mean(lasts):.3f}")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{p}]({p})" for p in pictures]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true",
                   help="the synthetic demo (required: the only report there is so far)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, from 3256 up (default 3)")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--no_ablations", action="store_true", help="skip the hair ablations")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="default results/")
    p.add_argument("--device", help="cuda, cpu... (default: cuda if present)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the figures and report.md from --out's report.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report of other settings (seeds, groups, ablations) in --out")
    return p


#: The files the report writes into ``--out``.
OUTPUTS = ("report.md", "report.json", "entropy_histograms.png", "accuracy.png", "ablations.png",
           "bridge_norms.png", "cost.png")


def report_command(args: argparse.Namespace) -> str:
    """The command line that makes this report (its settings; not where it is written)."""
    return (f"python -m kamal_attr.report --demo --seeds {args.seeds}"
            + ("" if args.groups == list(GROUPS) else " --groups " + " ".join(args.groups))
            + (" --no_ablations" if args.no_ablations else ""))


def read_report(path: Path) -> dict[str, Any] | None:
    """An earlier report of this command (its ``report.json``: seeds and runs), or None for
    anything else."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours = (isinstance(report, dict) and isinstance(report.get("runs"), dict)
            and isinstance(report.get("seeds"), list)
            and all(isinstance(seed, int) for seed in report["seeds"]))
    return report if ours else None


def check_out(out: Path, command: str | None, overwrite: bool) -> list[str]:
    """Refuse a ``--out`` folder holding any file of the report's names that this command
    did not write (a ``report.json`` of ours proves the folder is ours), or, unless
    ``overwrite``, the report of another ``command`` (a 3-seed report took an hour and a
    half: a quick one-seed run must not replace it unasked). ``command`` None: a redraw.
    Returns the report's files already there, proven ours."""
    check_output_path(out / "report.json", "--out")
    previous = read_report(out / "report.json")
    taken = [name for name in OUTPUTS if (out / name).exists()]
    if taken and previous is None:
        raise KamalError(f"{out} holds {', '.join(taken)}, which this command did not write; "
                         "pass another --out")
    made_by = None if previous is None else previous.get("command")
    if previous is not None and command is not None and made_by != command and not overwrite:
        what = f"`{made_by}`" if made_by else "an earlier version of this command"
        raise KamalError(f"{out} holds the report of {what}; this run (`{command}`) would "
                         "replace it: pass another --out, or --overwrite")
    return taken


def write_report(report: dict[str, Any], out: Path, ours: Collection[str],
                 record: bool = True) -> Path:
    """The figures and ``report.md`` into ``out``, after ``report.json`` when ``record``
    (atomically: it is what the report was made from; a redraw leaves it as it is). Figures
    in ``ours`` (an earlier report's, :func:`check_out`) that this one does not draw (its
    ablations, when run without) are removed: they would stand beside a report that does not
    show them."""
    if record:
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    pictures = figures(report, out)
    for name in ours:
        if name.endswith(".png") and name not in pictures:
            (out / name).unlink(missing_ok=True)
    return write_markdown(report, pictures, out)


def main(args: argparse.Namespace) -> None:
    if not args.demo:
        raise KamalError("the report runs the synthetic demo only: pass --demo")
    if args.seeds < 1:
        raise KamalError(f"--seeds must be >= 1, got {args.seeds}")
    if rank_and_world()[1] > 1:
        raise KamalError("the report runs in one process: start it with python, not torchrun")
    if args.replot:
        refuse_ignored("--replot", "redraws the report in --out", {
            "--overwrite": args.overwrite, "--no_ablations": args.no_ablations,
            "--device": args.device})
    ours = check_out(args.out, None if args.replot else report_command(args), args.overwrite)
    if args.replot:
        report = read_report(args.out / "report.json")
        if report is None:
            raise KamalError(f"--replot: no report in {args.out / 'report.json'}; run the report "
                             "first")
        try:
            print(f"report redrawn: {write_report(report, args.out, ours, record=False)}")
        except KeyError as e:
            raise KamalError(f"--replot: {args.out / 'report.json'} lacks {e}; run the report "
                             "again") from None
        return
    began = time.perf_counter()
    seeds = [3256 + k for k in range(args.seeds)]
    device = ["--device", args.device] if args.device else []
    report: dict[str, Any] = {"seeds": seeds, "runs": {}, "ablations": {}, "bridge_rms": {},
                              "torch": torch.__version__, "command": report_command(args)}
    for seed in seeds:
        for group in args.groups:
            result, cfg = run_demo(seed_flags(seed, seeds[0]) + device, group, fit=True)
            report["runs"].setdefault(group, {})[str(seed)] = result
            if group == "hair" and not args.no_ablations:
                if seed == seeds[0]:
                    report["bridge_rms"]["with penalty"] = bridge_curves(cfg, group)
                for variant, flags in ABLATIONS.items():
                    result, cfg = run_demo(seed_flags(seed, seeds[0]) + device + flags, group)
                    report["ablations"].setdefault(variant, {})[str(seed)] = result
                    if variant == "no penalty" and seed == seeds[0]:
                        report["bridge_rms"]["without penalty"] = bridge_curves(cfg, group)
    report["seconds"] = time.perf_counter() - began
    path = write_report(report, args.out, ours)
    print(f"report written to {path} ({report['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    run(lambda: main(get_args_parser().parse_args()),
        interrupted="finished nets and saved epochs are kept: rerun the same command to go on")
