"""The `kosmos` command line: one entry point, each area registering its own sub-commands.

Exit codes: 0 success; 1 a failure while working (a corpus that can no longer feed training, a run
of non-finite steps, a run folder in use, an unexpected error); 2 a usage, config or input error (an
unknown option or key, a missing or unreadable file, an impossible setting); 130 interrupted.
An expected failure prints one line on stderr (one per problem where several were found together);
`kosmos --debug ...` prints its traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from kosmos import __version__
from kosmos.config import ConfigError, InputError

# Each module exposes `register(subparsers)`. It must import nothing heavy (torch, DeepSpeed,
# open_clip, transformers) at module level: handlers import what they need when they run, so that
# `kosmos --help` stays fast.
AREAS = (
    "kosmos.model.cli",
    "kosmos.data.cli",
    "kosmos.tokenizer.cli",
    "kosmos.train.cli",
    "kosmos.eval.cli",
    "kosmos.convert.cli",
    "kosmos.bench",
    "kosmos.serve",
)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
FP32_HELP = "keep fp32 on a GPU (default there: bf16, an order of magnitude faster; the CPU runs fp32)"


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kosmos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kosmos {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an expected failure too")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for area in AREAS:
        importlib.import_module(area).register(subparsers)
    return parser


def exit_code(error: BaseException) -> int | None:
    """The exit code of an expected failure, or None for an unexpected one (a bug: keep its traceback)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, (ConfigError, InputError, OSError)):
        return EXIT_USAGE
    # The errors the project raises on purpose (CheckpointError, DataError, ConversionError, ...)
    # describe themselves; they are defined in its own modules.
    if type(error).__module__.startswith("kosmos."):
        return EXIT_FAILURE
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure gets an exit code
        from kosmos.data.sources import scrub  # a message may hold a URL with credentials

        code = exit_code(error)
        if code is None or args.debug:
            traceback.print_exc()
        if code is None:
            return EXIT_FAILURE
        kind = "config error" if isinstance(error, ConfigError) else "error"
        if isinstance(error, KeyboardInterrupt):
            messages = ["interrupted"]
        else:  # several problems found together: one line each
            messages = [f"{kind}: {problem}" for problem in getattr(error, "problems", [error])]
        for message in messages:
            print(f"kosmos {args.command}: {scrub(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
