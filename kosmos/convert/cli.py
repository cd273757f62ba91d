"""`kosmos convert to-hf | from-hf | clip-from-hf`: checkpoints to and from `transformers` format."""

from __future__ import annotations

import argparse
import contextlib
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser("convert", help="export to and import from transformers' Kosmos-2")
    commands = convert.add_subparsers(dest="convert_command", required=True)

    to_hf = commands.add_parser(
        "to-hf",
        help="a run or checkpoint (any ZeRO stage) as a transformers Kosmos2ForConditionalGeneration folder",
    )
    to_hf.add_argument("checkpoint", help="run folder (its latest checkpoint) or one checkpoint folder")
    to_hf.add_argument("out_dir", help="folder to create (must not exist or be empty)")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    to_hf.set_defaults(handler=_to_hf)

    from_hf = commands.add_parser(
        "from-hf",
        help="a transformers Kosmos-2 folder as one of our checkpoints (for train.init_from or eval)",
    )
    from_hf.add_argument("hf_dir", help="folder with config.json, weights and sentencepiece.bpe.model")
    from_hf.add_argument("out_dir", help="checkpoint folder to create (must not exist or be empty)")
    from_hf.set_defaults(handler=_from_hf)

    clip = commands.add_parser(
        "clip-from-hf", help="a transformers CLIP vision tower as a file for model.vision.weights"
    )
    clip.add_argument(
        "hf_dir", help="transformers CLIPModel or CLIPVisionModel folder (QuickGELU, e.g. OpenAI's)"
    )
    clip.add_argument("out_file", help="the .safetensors file to write")
    clip.set_defaults(handler=_clip_from_hf)


def _run(convert, *args, **kwargs) -> int:
    from kosmos.convert import ConversionError

    try:
        # stdout carries only the path written; DeepSpeed and transformers report on it otherwise.
        with contextlib.redirect_stdout(sys.stderr):
            out = convert(*args, **kwargs)
    except ConversionError as error:
        print(f"kosmos convert: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    from kosmos.convert import checkpoint_to_hf

    return _run(
        checkpoint_to_hf, args.checkpoint, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size
    )


def _from_hf(args: argparse.Namespace) -> int:
    from kosmos.convert import hf_to_checkpoint

    return _run(hf_to_checkpoint, args.hf_dir, args.out_dir)


def _clip_from_hf(args: argparse.Namespace) -> int:
    from kosmos.convert import clip_from_hf

    return _run(clip_from_hf, args.hf_dir, args.out_file)
