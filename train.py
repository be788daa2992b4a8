"""Adaptive knowledge amalgamation: source nets -> component nets -> target net.

    python train.py --target_attribute hair --demo      # the whole CPU demo, ~12 min on 2 cores
    python train.py --target_attribute eye --stage component

Stage 1 (component) routes every training image to its least-ambiguous source net
(min entropy impurity), writes the routing lists, and trains one component net per
attribute through transfer bridges. Stage 2 (target) amalgamates the components into one
multi-head target net. With --demo, missing source nets are trained first, and the
test-split table of evaluate.py is printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses

from kamal_attr.attributes import GROUPS, check_group, source_nets_of
from kamal_attr.cli import ArgumentParser, run
from kamal_attr.config import (DEMO, WIDTH, add_amalgamation_args, add_common_args,
                               learning_rate, resolve_config)
from kamal_attr.distributed import is_main_process
from kamal_attr.evaluation import report_group
from kamal_attr.runtime import demo_data_needed, ensure_data, start
from kamal_attr.stages import (GroupData, source_checkpoints, train_component, train_source_net,
                               train_target)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("amalgamation")
    g.add_argument("--target_attribute", default="hair", help="group: hair, eye or face (default hair)")
    g.add_argument("--stage", choices=["component", "target", "all"], default="all")
    add_amalgamation_args(g)
    g.add_argument("--lr", type=learning_rate,
                   help="learning rate of nets and bridges, in (0, 1] (1e-4; demo 1e-3)")
    g.add_argument("--width", type=WIDTH, help="component net base width (64; demo 16)")
    g.add_argument("--target_width", type=WIDTH, help="target net base width (90; demo 24)")
    add_common_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    group = check_group(args.target_attribute)
    cfg = resolve_config(args)
    demo_data_needed(cfg)  # refuses a folder it must not write to, before anything is written
    if args.stage in ("component", "all") and not cfg.demo:
        for attribute in GROUPS[group]:  # missing teachers, too, stop the run before that
            source_checkpoints(group, attribute, cfg)
    start(cfg)
    ensure_data(cfg)
    if cfg.demo:  # the one-command demo: make whatever teachers are missing
        # The teachers stand in for published nets: the demo preset's, whatever the student's
        # --width, --lr or --batch_size (a --sorce_saveEpoch they lack is reported as such).
        demo_sources = dataclasses.replace(
            cfg, width=DEMO.width, batch_size=DEMO.batch_size, source_epochs=DEMO.source_epochs,
            source_optim=dataclasses.replace(DEMO.source_optim), overwrite=False)
        for spec in source_nets_of(group):
            train_source_net(spec, demo_sources)
    data = GroupData(group, cfg)  # decoded once, shared by the components and the target
    if args.stage in ("component", "all"):
        for attribute in GROUPS[group]:
            train_component(group, attribute, cfg, data)
    if args.stage in ("target", "all"):
        train_target(group, cfg, data)
    if cfg.demo and is_main_process():
        report_group(group, cfg, json_path=cfg.log_dir / f"evaluate_{group}_{cfg.variant}.json")


if __name__ == "__main__":
    run(lambda: main(get_args_parser().parse_args()))
