"""Adaptive knowledge amalgamation: source nets -> component nets -> target net.

    python train.py --target_attribute hair --demo      # the whole CPU demo, ~7 min on 2 cores
    python train.py --target_attribute eye --stage component
    python train.py --attributes Black_Hair Smiling Male --name bsm   # teachers from the pool

A task is a preset group (--target_attribute: METHOD.md's teachers) or any attribute set
(--attributes: every source net under --sourcenets_root with a head for an attribute
teaches it). Stage 1 (component) routes every training image to its least-ambiguous
teacher (min entropy impurity), writes the routing lists, and trains one component net per
attribute through transfer bridges. Stage 2 (target) amalgamates the components into one
multi-head target net. With --demo, missing source nets are trained first, and the
test-split table of evaluate.py is printed at the end.
"""
from __future__ import annotations

import argparse

from kamal_attr.cli import resume_hint, run
from kamal_attr.config import amalgamation_parser, resolve_config
from kamal_attr.distributed import is_main_process
from kamal_attr.evaluation import check_result_path, demo_result_path, report_task
from kamal_attr.pool import check_task_flags, named_attributes, select_task
from kamal_attr.runtime import demo_data_needed, ensure_data, start
from kamal_attr.stages import amalgamate, check_teachers


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return amalgamation_parser(__doc__, add_help)


def main(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    group = check_task_flags(args.target_attribute, args.attributes)
    demo_data_needed(cfg)  # refuses a folder it must not write to, before anything is written
    task = None  # the demo selects it once its teachers exist
    if not cfg.demo:  # an uncovered attribute or a missing teacher stops the run here
        task = select_task(group, args.attributes, args.name, cfg.sources_root,
                           cfg.source_save_epoch, need_teachers=args.stage != "target")
        if args.stage in ("component", "all"):
            for attribute in task.attributes:
                check_teachers(task, attribute, cfg)
    else:  # bad names, or a file in the way of the demo's result, stop it before the data is made
        name = (named_attributes(args.attributes, args.name)[1] if args.attributes else
                select_task(group, None, args.name, cfg.sources_root, 1).name)  # group, --name
        check_result_path(demo_result_path(cfg, name), flag=None)
    start(cfg)
    ensure_data(cfg)
    task = amalgamate(cfg, group, args.attributes, args.name, args.stage, task=task)
    if cfg.demo and is_main_process():
        report_task(task, cfg, json_path=demo_result_path(cfg, task.name), json_flag=None)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    run(lambda: main(args), interrupted=resume_hint(args.overwrite))
