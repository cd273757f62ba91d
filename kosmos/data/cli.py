"""`kosmos data sample | build | index | inspect`: make corpus folders, index shards, look inside them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kosmos.cli import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build and inspect WebDataset corpora")
    commands = data.add_subparsers(dest="data_command", required=True)

    sample = commands.add_parser("sample", help="the embedded sample corpus, eval sets and tokenizer")
    sample.add_argument("--out", required=True, type=Path, help="folder to create (absent or empty)")
    sample.set_defaults(handler=_sample)

    build = commands.add_parser("build", help="shard a corpus into a WebDataset folder with an index")
    kinds = build.add_subparsers(dest="kind", required=True)
    text = kinds.add_parser("text", help="one document per JSONL line")
    text.add_argument("--input", required=True, nargs="+", type=Path, help="JSONL files")
    text.add_argument("--field", default="text", help="the field holding the text (default: text)")
    caption = kinds.add_parser("caption", help="image-caption pairs from a list or from shards")
    source = caption.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="CSV, TSV or JSONL list of image paths and captions")
    source.add_argument(
        "--shards", nargs="+", type=Path, help="tar shards in WebDataset layout (img2dataset)"
    )
    caption.add_argument("--images", type=Path, help="folder the list's image paths are relative to")
    caption.add_argument("--image-field", default="image", help="column of the image path (default: image)")
    caption.add_argument(
        "--caption-field", default="caption", help="column of the caption (default: caption)"
    )
    interleaved = kinds.add_parser(
        "interleaved", help="OBELICS-style documents (parallel texts/images lists)"
    )
    interleaved.add_argument("--input", required=True, nargs="+", type=Path, help="JSONL or Parquet files")
    interleaved.add_argument(
        "--images", type=Path, help="folder image paths are relative to (default: each input's folder)"
    )
    instruction = kinds.add_parser(
        "instruction", help="(instruction, input, output) triples for instruction tuning (Alpaca layout)"
    )
    instruction.add_argument(
        "--input", required=True, nargs="+", type=Path, help="JSONL, Parquet or CSV files"
    )
    scienceqa = kinds.add_parser(
        "scienceqa",
        help="ScienceQA problems as an instruction corpus for one multimodal chain-of-thought stage",
        description="rationale: QCM -> lecture and solution; answer: QCM + rationale -> 'The answer is "
        "(X).'; direct: QCM -> 'The answer is (X).' (the one-stage baseline). See docs/mmcot.md.",
    )
    scienceqa.add_argument(
        "--root", required=True, type=Path, help="folder with problems.json, pid_splits.json and images/"
    )
    scienceqa.add_argument("--split", default="train", help="a split of pid_splits.json (default: train)")
    scienceqa.add_argument("--stage", required=True, choices=("rationale", "answer", "direct"))
    scienceqa.add_argument(
        "--rationales",
        type=Path,
        help="answer stage: stage-1 generations (JSON lines with id and prediction, as `kosmos mmcot "
        "rationales` writes) joined by problem id, instead of the gold lecture and solution",
    )
    for parser in (text, caption, interleaved, instruction, scienceqa):
        parser.add_argument(
            "--out", required=True, type=Path, help="corpus folder to create (absent or empty)"
        )
        parser.add_argument("--samples-per-shard", type=positive_int, default=10_000)
        parser.add_argument("--max-shard-mb", type=positive_int, default=1024)
        parser.set_defaults(handler=_build)

    index = commands.add_parser(
        "index",
        help="an index for WebDataset shards where they lie (local, s3://, gs://, https://); nothing is copied",
    )
    index.add_argument(
        "src",
        nargs="+",
        help="shards, folders or URL prefixes of shards, or globs (.tar, .tar.gz, .tgz, .tar.zst)",
    )
    index.add_argument("--out", required=True, type=Path, help="folder to write index.json into")
    index.add_argument(
        "--kind",
        default="caption",
        choices=("text", "caption", "interleaved", "instruction"),
        help="what the shards hold (default: caption, as img2dataset writes)",
    )
    index.add_argument(
        "--read-retry-s",
        type=float,
        default=600.0,
        help="how long transient errors of a remote read are retried, in all (default: 600)",
    )
    index.add_argument(
        "--read-timeout-s",
        type=float,
        default=60.0,
        help="a connection or read that gets nothing for this long fails, and is retried (default: 60)",
    )
    index.set_defaults(handler=_index)

    inspect = commands.add_parser("inspect", help="samples, tokens, images and skips of a corpus folder")
    inspect.add_argument(
        "folder", help="a corpus folder or URL (s3://, https://, ...), or a local folder of corpus folders"
    )
    inspect.add_argument(
        "--tokenizer",
        type=Path,
        help="SentencePiece model for token counts (default: FOLDER/tokenizer.model, of a local FOLDER)",
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=_inspect)


def _sample(args: argparse.Namespace) -> int:
    from kosmos.data.sample import build_sample

    counts = build_sample(args.out)
    print(f"sample corpus in {args.out}: " + ", ".join(f"{n} {name}" for name, n in counts.items()))
    return 0


def _build(args: argparse.Namespace) -> int:
    from kosmos.config import ConfigError
    from kosmos.data import build

    options = {"samples_per_shard": args.samples_per_shard, "max_shard_bytes": args.max_shard_mb << 20}
    if args.kind == "text":
        index = build.build_text(args.input, args.out, field=args.field, **options)
    elif args.kind == "caption" and args.shards:
        index = build.build_caption_shards(args.shards, args.out, **options)
    elif args.kind == "caption":
        if args.images is None:
            raise ConfigError(
                "--images: needed with --input (the folder the list's image paths are relative to)"
            )
        fields = {"image_field": args.image_field, "caption_field": args.caption_field}
        index = build.build_caption_list(args.input, args.images, args.out, **fields, **options)
    elif args.kind == "instruction":
        index = build.build_instruction(args.input, args.out, **options)
    elif args.kind == "scienceqa":
        from kosmos.data.scienceqa import build_scienceqa

        index = build_scienceqa(args.root, args.split, args.stage, args.out, args.rationales, **options)
    else:
        index = build.build_interleaved(args.input, args.out, images=args.images, **options)
    print(
        f"{args.out}: {index.num_samples} {args.kind} samples in {len(index.shards)} shards; skipped {index.skipped}"
    )
    return 0


def _index(args: argparse.Namespace) -> int:
    from kosmos.data import sources
    from kosmos.data.indexer import index_shards

    options = sources.ReadOptions(retry_s=args.read_retry_s, timeout_s=args.read_timeout_s)
    index, origins = index_shards(args.src, args.out, args.kind, options)
    print(
        f"{args.out / 'index.json'}: {index.num_samples} {args.kind} samples in {len(index.shards)} shards at "
        f"{sources.redact(index.base) if index.base else args.out} (counts: {origins['stats']} from "
        f"*_stats.json, {origins['headers']} from tar headers)"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kosmos.config import ConfigError
    from kosmos.data import sources
    from kosmos.data.inspection import inspect
    from kosmos.tokenizer import Tokenizer, TokenizerError

    local = Path(sources.local_path(args.folder)) / "tokenizer.model" if sources.is_local(args.folder) else None
    tokenizer_file = args.tokenizer or local
    try:
        tokenizer = Tokenizer(tokenizer_file) if args.tokenizer or (local and local.is_file()) else None
    except TokenizerError as error:
        raise ConfigError(f"--tokenizer: {error}") from None
    report = inspect(args.folder, tokenizer)
    if args.json:
        print(json.dumps(report))
        return 0
    for name, corpus in [*report["corpora"].items(), ("total", {**report, "kind": ""})]:
        tokens = "-" if corpus["tokens"] is None else f"{corpus['tokens']:,}"
        print(
            f"{name:>12}  {corpus['kind']:<11} {corpus['samples']:>9,} samples  {tokens:>12} tokens  "
            f"{corpus['images']:>8,} images  {corpus['shards']} shards"
        )
        for label, counts in (("skipped", corpus["skipped"]), ("dropped images", corpus["dropped_images"])):
            if counts:
                print(f"{'':>14}{label}: " + ", ".join(f"{reason} {n}" for reason, n in counts.items()))
    if tokenizer is None:
        print("(no tokenizer: pass --tokenizer to count tokens)")
    return 0
