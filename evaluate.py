"""Test-split accuracy of a task's (a group's, or any attribute set's) teachers, components and target.

    python evaluate.py --target_attribute hair --demo --json run/demo/hair.json
    python evaluate.py --attributes Black_Hair Smiling Male --demo
    python evaluate.py --checkpoint snapshot/sources/hair/source1_Black_Hair/epoch_040.pth
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kamal_attr.cli import ArgumentParser, refuse_ignored, run
from kamal_attr.config import add_amalgamation_args, add_common_args, add_task_args, resolve_config
from kamal_attr.distributed import is_main_process
from kamal_attr.evaluation import (check_result_path, evaluate_checkpoint, locate_nets,
                                   report_task, write_result)
from kamal_attr.pool import check_task_flags, select_task
from kamal_attr.runtime import demo_data_needed, ensure_data, start


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    add_task_args(g)
    g.add_argument("--checkpoint", type=Path, help="instead: any one checkpoint of this project")
    g.add_argument("--split", choices=["train", "val", "test"], default="test")
    g.add_argument("--json", type=Path, help="also write the result as JSON here (an earlier "
                   "result of this command there is replaced; any other file is refused)")
    g.add_argument("--by_style", action="store_true",
                   help="synthetic data: also split the source nets' and the min-entropy "
                        "choice's accuracy by photo style")
    add_amalgamation_args(g)
    add_common_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    group = check_task_flags(args.target_attribute, args.attributes)
    if args.checkpoint:
        refuse_ignored("--checkpoint", "evaluates that one file", {
            "--target_attribute": args.target_attribute, "--attributes": args.attributes,
            "--name": args.name, "--by_style": args.by_style,
            "--selection": None if args.selection == "entropy" else args.selection,
            "--no_feature_loss": args.no_feature_loss, "--no_penalty": args.no_penalty,
            "--sorce_saveEpoch": args.source_save_epoch,
            "--component_saveEpoch": args.component_save_epoch,
            "--target_epoch": args.target_epoch, "--sourcedata_txtroot": args.sourcedata_txtroot,
            "--componentnets_root": args.componentnets_root, "--target_root": args.target_root})
    demo_data_needed(cfg)
    if args.json:  # before any evaluation: a file that is not ours stops the run now
        check_result_path(args.json)
    if not args.checkpoint:  # an uncovered attribute or an epoch that was not saved: stop
        task = select_task(group, args.attributes, args.name,  # before writing
                           cfg.sources_root, cfg.source_save_epoch)
        locate_nets(task, cfg)
    start(cfg)
    ensure_data(cfg)
    if not is_main_process():  # under torchrun, one process evaluates
        return
    if not args.checkpoint:
        report_task(task, cfg, args.split, args.json, args.by_style)
        return
    accuracy = evaluate_checkpoint(args.checkpoint, cfg, args.split)
    width = max(len(a) for a in accuracy)
    print(f"{'attribute'.ljust(width)}  accuracy  majority  (%, {args.split} split)")
    for attribute, r in accuracy.items():
        print(f"{attribute.ljust(width)}  {100 * r['accuracy']:8.2f}  {100 * r['majority']:8.2f}")
    mean = {k: sum(r[k] for r in accuracy.values()) / len(accuracy) for k in ("accuracy", "majority")}
    print(f"{'mean'.ljust(width)}  {100 * mean['accuracy']:8.2f}  {100 * mean['majority']:8.2f}")
    if args.json:
        write_result(args.json, {"checkpoint": str(args.checkpoint), "split": args.split,
                                 "accuracy": accuracy})


if __name__ == "__main__":
    run(lambda: main(get_args_parser().parse_args()))
