"""Adaptive knowledge amalgamation: source nets -> component nets -> target net.

    python train.py --target_attribute hair --demo      # the whole CPU demo, ~3 min on 2 cores
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
import dataclasses

from kamal_attr.cli import ArgumentParser, run
from kamal_attr.config import (DEMO, WIDTH, add_amalgamation_args, add_common_args, add_task_args,
                               learning_rate, resolve_config)
from kamal_attr.distributed import is_main_process
from kamal_attr.evaluation import report_task
from kamal_attr.models import ARCHS
from kamal_attr.pool import demo_teachers, named_attributes, select_task
from kamal_attr.attributes import check_group, source_nets_of
from kamal_attr.runtime import demo_data_needed, ensure_data, start
from kamal_attr.stages import TaskData, check_teachers, train_component, train_source_net, train_target


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, add_help=add_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("amalgamation")
    add_task_args(g)
    g.add_argument("--stage", choices=["component", "target", "all"], default="all")
    add_amalgamation_args(g)
    g.add_argument("--lr", type=learning_rate,
                   help="learning rate of nets and bridges, in (0, 1] (1e-4; demo 1e-3)")
    g.add_argument("--arch", choices=list(ARCHS), help="component nets' architecture (resnet18)")
    g.add_argument("--width", type=WIDTH, help="component net base width (64; demo 16)")
    g.add_argument("--target_arch", choices=list(ARCHS), help="target net's architecture (resnet18)")
    g.add_argument("--target_width", type=WIDTH, help="target net base width (90; demo 24)")
    add_common_args(p)
    return p


def make_demo_teachers(args: argparse.Namespace, cfg) -> None:
    """The one-command demo makes whatever teachers are missing: the group's table nets, or
    for ``--attributes`` those of :func:`~kamal_attr.pool.demo_teachers`. They stand in for
    published nets: the demo preset's, whatever the student's --arch, --width, --lr or
    --batch_size (a --sorce_saveEpoch they lack is reported as such)."""
    demo_sources = dataclasses.replace(
        cfg, width=DEMO.width, batch_size=DEMO.batch_size, source_epochs=DEMO.source_epochs,
        source_optim=dataclasses.replace(DEMO.source_optim), overwrite=False, arch="resnet18")
    if args.attributes:
        for spec, arch, part in demo_teachers(*named_attributes(args.attributes, args.name)):
            train_source_net(spec, dataclasses.replace(demo_sources, arch=arch), part)
    else:
        for spec in source_nets_of(args.target_attribute):
            train_source_net(spec, demo_sources)


def main(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    demo_data_needed(cfg)  # refuses a folder it must not write to, before anything is written
    choose = lambda: select_task(args.target_attribute, args.attributes, args.name,  # noqa: E731
                                 cfg.sources_root, cfg.source_save_epoch)
    if not cfg.demo:  # an uncovered attribute or a missing teacher stops the run here
        task = choose()
        if args.stage in ("component", "all"):
            for attribute in task.attributes:
                check_teachers(task, attribute, cfg)
    elif args.attributes:  # bad names stop the demo before the data is made
        named_attributes(args.attributes, args.name)
    else:
        check_group(args.target_attribute)
    start(cfg)
    ensure_data(cfg)
    if cfg.demo:
        make_demo_teachers(args, cfg)
        task = choose()
    data = TaskData(task, cfg)  # decoded once, shared by the components and the target
    if args.stage in ("component", "all"):
        for attribute in task.attributes:
            train_component(task, attribute, cfg, data)
    if args.stage in ("target", "all"):
        train_target(task, cfg, data)
    if cfg.demo and is_main_process():
        report_task(task, cfg, json_path=cfg.log_dir / f"evaluate_{task.name}_{cfg.variant}.json")


if __name__ == "__main__":
    run(lambda: main(get_args_parser().parse_args()))
