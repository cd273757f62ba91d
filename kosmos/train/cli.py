"""`kosmos train`: train a model under DeepSpeed, or resume the run folder's latest checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train under DeepSpeed (alone, or under torchrun / the deepspeed launcher); resumes a run "
        "folder that has checkpoints",
    )
    train.add_argument("--config", required=True, help="training YAML, e.g. configs/train/tiny.yaml")
    train.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100")
    train.add_argument(
        "--allow-config-change",
        action="append",
        default=[],
        metavar="KEY",
        help="on resume, accept a change of this key or section (repeatable), e.g. optimizer.lr; "
        "train.max_steps, train.log_interval, checkpoint.* and logging.* change without it",
    )
    # The deepspeed launcher passes --local_rank; the rank is read from the environment instead.
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from kosmos.train.config import load_train_config
    from kosmos.train.trainer import train

    cfg = load_train_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    return train(cfg, run_dir, args.allow_config_change)
