"""`kosmos model summary` (parameter counts of a config) and `kosmos generate` (text from a checkpoint)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from kosmos.cli import FP32_HELP, positive_int
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
    gen.add_argument("--max-new-tokens", type=positive_int, default=20)
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
    from pathlib import Path

    import torch

    from kosmos.checkpoint import load_model_from_checkpoint
    from kosmos.config import InputError
    from kosmos.data import image_transform
    from kosmos.data.decode import decode_image
    from kosmos.data.skips import SkipSample
    from kosmos.model import generate, inference_dtype

    if not any(kind == "text" for kind, _ in args.parts):
        raise InputError("give a --prompt")
    parts = []
    for kind, value in args.parts:
        if kind == "text":
            parts.append(value)
            continue
        try:
            parts.append(decode_image(Path(value).read_bytes()))
        except OSError as error:
            raise InputError(f"--image: cannot read {value}: {error.strerror or error}") from None
        except SkipSample as error:
            raise InputError(f"--image: {value} cannot be used: {error.reason.replace('_', ' ')}") from None

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # stdout is for the generated text: DeepSpeed, imported here for the first time, binds its
    # log handler to whatever stdout is at that moment.
    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer, model_cfg = load_model_from_checkpoint(args.checkpoint, device)
    model.to(inference_dtype(device, args.fp32))
    configure_threads()  # once the inputs are known to be good: an error stays one line

    transform = image_transform(model_cfg.vision.image_size)
    pictures = [transform(p) for p in parts if not isinstance(p, str)]
    images = torch.stack(pictures) if pictures else None
    prompt = tokenizer.encode_interleaved(parts, model_cfg.connector.num_queries, eos=False)
    strategy = "beam" if args.beams else "greedy"
    new_ids = generate(
        model,
        [prompt],
        images,
        max_new_tokens=args.max_new_tokens,
        strategy=strategy,
        num_beams=args.beams or 1,
    )[0]
    print(tokenizer.decode(new_ids))
    return 0
