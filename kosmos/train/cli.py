"""`kosmos train`: train a model under DeepSpeed, or resume the run folder's latest checkpoint;
`kosmos report`: one page on a run, finished or in progress."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import get_args

from kosmos.model.config import AttentionChoice
from kosmos.threads import configure_threads
from kosmos.train.resume_keys import free_keys_listed


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
        help="on resume, accept a change of this key or section (repeatable), e.g. optimizer.lr; these "
        f"change without it: {free_keys_listed()}",
    )
    # The deepspeed launcher passes --local_rank; the rank is read from the environment instead.
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    plan = train.add_argument_group(
        "dry run", "--dry-run checks the config and all it names, trains nothing, and prints a plan"
    )
    plan.add_argument("--dry-run", action="store_true", help="validate and plan instead of training")
    plan.add_argument("--gpus", type=int, help="GPUs to plan for (default: this launch's world size)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    plan.add_argument("--gpu-memory", type=float, help="GB per GPU (default: this GPU's, else 80)")
    plan.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s of one GPU (default: known GPUs, H100)")
    plan.add_argument(
        "--mfu", type=float, action="append", help="model FLOP utilisation (repeatable; default 0.4 and 0.55)"
    )
    plan.add_argument(
        "--attention",
        choices=[name for name in get_args(AttentionChoice) if name != "auto"],
        help="attention backend the GPUs train with (default: what model.attention resolves to on a GPU)",
    )
    plan.add_argument("--probe-documents", type=int, default=16, help="documents read per corpus (default 16)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    train.set_defaults(handler=_train)

    report = subparsers.add_parser(
        "report",
        help="one page on a run (finished or in progress): losses, validation, LR, grad norm, throughput, "
        "skips, rollbacks, evaluated checkpoints",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN", help="run folder")
    report.add_argument("--out", type=Path, help="output folder (default RUN/report)")
    report.set_defaults(handler=_report)


# The dry run's options that have no default: given without --dry-run they would be silently ignored.
_PLAN_ONLY = ("gpus", "gpu_memory", "peak_tflops", "mfu", "attention", "json")


def _train(args: argparse.Namespace) -> int:
    if args.dry_run:
        from kosmos.train.plan import dry_run

        return dry_run(args)
    given = [f"--{name.replace('_', '-')}" for name in _PLAN_ONLY if getattr(args, name) not in (None, False)]
    if given:
        from kosmos.config import ConfigError

        raise ConfigError(f"{', '.join(given)}: only with --dry-run (a training plans nothing)")
    from kosmos.train.run_folder import trained_steps

    cfg, run_dir = _checked_launch(args)
    steps = trained_steps(run_dir)
    if steps is not None and steps >= cfg.train.max_steps:
        print(
            f"{run_dir} is trained: its latest checkpoint is at step {steps}, train.max_steps is "
            f"{cfg.train.max_steps}; raise train.max_steps to train on"
        )
        return 0
    from kosmos.train.trainer import train

    configure_threads(cfg.data.num_workers, cfg.train.threads)
    return train(cfg, run_dir, args.allow_config_change)


def _checked_launch(args: argparse.Namespace):
    """The config and run folder of a launch, after every check that needs no model (config, inputs,
    step layout, the run folder's lock and a resume's changes), made before torch and DeepSpeed are
    imported; their problems are raised all together."""
    from kosmos import config as config_io
    from kosmos.train.config import TrainConfig, input_problems
    from kosmos.train.run_folder import launch_problems

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    cfg, problems = config_io.load_collecting(TrainConfig, args.config, args.overrides)
    if cfg is not None:
        problems += input_problems(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        # Rank 0 checks the folder: the other ranks would find it holding the lock already.
        if int(os.environ.get("RANK", "0")) == 0:
            problems += launch_problems(run_dir, cfg, args.allow_config_change)
    config_io.raise_problems(problems)
    return cfg, run_dir


def _report(args: argparse.Namespace) -> int:
    from kosmos.train.report import write_report

    print(f"run report: {write_report(args.run_dir, args.out)}")
    return 0
