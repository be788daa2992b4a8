"""Train source nets (the teachers) of METHOD.md's table, or a net on any attributes.

    python train_sourcenet.py --target_attribute Black_Hair --source_id 1
    python train_sourcenet.py --all --group hair --demo
    python train_sourcenet.py --attributes Smiling Male --name smile_male --arch resnet34
    python train_sourcenet.py --list_pool --demo         # the teachers train.py --attributes sees
"""
from __future__ import annotations

import argparse

from kamal_attr import KamalError
from kamal_attr.cli import ArgumentParser, refuse_ignored, resume_hint, run
from kamal_attr.config import (DEMO, POSITIVE, REAL, WIDTH, add_common_args, learning_rate,
                               resolve_config)
from kamal_attr.models import ARCHS, build_model
from kamal_attr.pool import discover_pool, format_pool, select_source_nets
from kamal_attr.distributed import leave_group, my_share
from kamal_attr.runtime import demo_data_needed, ensure_data, setup_logging, start
from kamal_attr.stages import train_source_net


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("which source net")
    g.add_argument("--target_attribute",
                   help="component attribute the source net serves (default Black_Hair)")
    g.add_argument("--source_id", type=POSITIVE, help="source id within its group (default 1)")
    g.add_argument("--all", action="store_true",
                   help="train every source net of --group (of all groups without --group); "
                        "under torchrun each process trains its share of them")
    g.add_argument("--group", choices=["hair", "eye", "face"], help="with --all")
    g.add_argument("--attributes", nargs="+",
                   help="instead: a net on these attributes ('all' = the 40), saved as --name")
    g.add_argument("--name", help="folder name of an --attributes net (saved under "
                   "--sourcenets_root/custom/NAME; default custom)")
    g.add_argument("--list_pool", action="store_true",
                   help="print the teacher pool (every source net under --sourcenets_root: "
                        "architecture, width, input size, epoch, val accuracy) and exit")
    g.add_argument("--train_part", help="train on part k of P disjoint blocks of the train split, "
                   "as 'k/P' (demo default: the k-th of an attribute's S source nets uses part k/S)")
    add_common_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=POSITIVE,
                   help=f"epochs ({REAL.source_epochs}; demo {DEMO.source_epochs})")
    g.add_argument("--lr", type=learning_rate, help="learning rate, in (0, 1] (SGD 1e-4; demo Adam 1e-3)")
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--schedule", choices=["step", "cosine"],
                   help="per-epoch schedule: x0.5 at 5,10,...,25 (step) or cosine (demo)")
    g.add_argument("--arch", choices=list(ARCHS), help="architecture (resnet18)")
    g.add_argument("--width", type=WIDTH, help="base width (64; demo 16)")
    g.add_argument("--pretrained", help="ImageNet init: auto (weights/resnet/<arch>*.pth if present), "
                   "none, or a .pth path (default auto; demo none)")
    return p


def parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise KamalError(f"--train_part must look like 2/3, got {text!r}") from None
    if not 1 <= k <= parts:
        raise KamalError(f"--train_part {text}: need 1 <= k <= P")
    return k, parts


def main(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    if args.list_pool:
        refuse_ignored("--list_pool", "lists the pool and trains nothing", {
            "--all": args.all, "--group": args.group, "--target_attribute": args.target_attribute,
            "--source_id": args.source_id, "--attributes": args.attributes, "--name": args.name,
            "--train_part": args.train_part, "--overwrite": args.overwrite, "--epochs": args.epochs,
            "--lr": args.lr, "--optimizer": args.optimizer, "--schedule": args.schedule,
            "--arch": args.arch, "--width": args.width})
        print(format_pool(*discover_pool(cfg.sources_root, cfg.source_save_epoch), cfg.sources_root))
        return
    part = parse_part(args.train_part)
    specs = select_source_nets(args.target_attribute, args.source_id, args.all, args.group,
                               args.attributes, args.name)
    # missing or unreadable ImageNet weights stop the run now, before the data is made
    build_model(specs[0].attributes, cfg.width, cfg.pretrained, cfg.weights_dir, cfg.arch)
    demo_data_needed(cfg)
    # Under torchrun, --all gives each process whole source nets (they are independent);
    # one net is trained by all processes together (DistributedDataParallel).
    spread = len(specs) > 1
    start(cfg, independent=spread)
    ensure_data(cfg)
    if spread:
        leave_group()
        setup_logging(cfg.log_dir)  # from now on each process trains and logs nets of its own
    for spec in my_share(specs) if spread else specs:
        train_source_net(spec, cfg, part)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    run(lambda: main(args), interrupted=resume_hint(args.overwrite))
