"""`kosmos model summary` (parameter counts of a config) and `kosmos generate` (text from a checkpoint)."""

from __future__ import annotations

import argparse
import json

from kosmos.cli import FP32_HELP, positive_int
from kosmos.model.prompting import DEFAULT_MAX_NEW_TOKENS
from kosmos.threads import configure_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="inspect model configurations")
    commands = model.add_subparsers(dest="model_command", required=True)
    summary = commands.add_parser("summary", help="parameter counts (meta device, nothing allocated)")
    summary.add_argument("--config", required=True, help="model YAML, e.g. configs/model/kosmos1.yaml")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(handler=_summary)

    gen = subparsers.add_parser(
        "generate",
        help="continue a prompt of images and text; prints the generated text alone on stdout",
        description="Images and prompt texts are laid out in the order given on the command line, so "
        "`--image a.jpg --prompt 'An image of'` captions, and `--image a.jpg --prompt 'A cat.' --image "
        "b.jpg --prompt 'A'` is a one-shot prompt.",
    )
    gen.add_argument(
        "--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder"
    )
    gen.add_argument(
        "--image", action=_PromptPart, dest="parts", metavar="IMG", help="an image file (repeatable)"
    )
    gen.add_argument(
        "--prompt", action=_PromptPart, dest="parts", metavar="TEXT", help="prompt text (repeatable)"
    )
    gen.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    decoding = gen.add_mutually_exclusive_group()
    decoding.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    decoding.add_argument("--beams", type=positive_int, metavar="K", help="beam search with K beams")
    gen.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    gen.add_argument("--fp32", action="store_true", help=FP32_HELP)
    gen.set_defaults(handler=_generate, parts=[])


class _PromptPart(argparse.Action):
    """Collects --image and --prompt values into one list that keeps their command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        kind = "image" if option_string == "--image" else "text"
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), (kind, value)])


def _summary(args: argparse.Namespace) -> int:
    from kosmos.model import load_model_config, parameter_counts

    counts = parameter_counts(load_model_config(args.config))
    if args.json:
        print(json.dumps(counts))
    else:
        for name, value in counts.items():
            print(f"{name:>17}: {value:>15,}  ({value / 1e9:.3f}B)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from kosmos.config import InputError
    from kosmos.model.prompting import Decoding, Prompter, read_image_file

    if not any(kind == "text" for kind, _ in args.parts):
        raise InputError("give a --prompt")
    try:
        parts = [value if kind == "text" else read_image_file(value) for kind, value in args.parts]
    except InputError as error:
        raise InputError(f"--image: {error}") from None
    decoding = Decoding(max_new_tokens=args.max_new_tokens, beams=args.beams or 1)
    prompter = Prompter(args.checkpoint, args.device, args.fp32)
    configure_threads()  # once the inputs are known to be good: an error stays one line
    print(prompter.continue_prompt(parts, decoding))
    return 0
