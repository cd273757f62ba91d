"""The `kosmos` command line: one entry point, each area registering its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from kosmos.config import ConfigError

# Each module exposes `register(subparsers)`; handlers import their heavy dependencies lazily so
# that `kosmos --help` stays fast.
AREAS = (
    "kosmos.model.cli",
    "kosmos.data.cli",
    "kosmos.tokenizer.cli",
    "kosmos.train.cli",
    "kosmos.eval.cli",
    "kosmos.convert.cli",
    "kosmos.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kosmos", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for area in AREAS:
        importlib.import_module(area).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except ConfigError as error:
        print(f"kosmos: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
