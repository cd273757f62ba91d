"""`kosmos tokenizer train | inspect`: a SentencePiece tokenizer from corpora, and a look inside one."""

from __future__ import annotations

import argparse
import json

EXAMPLES = (
    "An image of a dog playing with a ball on the beach.",
    "Question: What color is the car? Answer: red",
    "The text <image> stays text.",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    tokenizer = subparsers.add_parser("tokenizer", help="train and inspect SentencePiece tokenizers")
    commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)

    train = commands.add_parser(
        "train",
        help="train a SentencePiece model on the text of corpora, in the fairseq id layout",
        description="Sentences are the lines of text documents, captions and the texts of interleaved "
        "documents. A uniform sample of at most --max-sentences of them is kept while reading, so a "
        "corpus of any size trains in bounded memory; --max-documents bounds the reading too.",
    )
    train.add_argument(
        "--corpus",
        required=True,
        nargs="+",
        help="corpus folders or URLs (or their index.json), or folders of corpus folders",
    )
    train.add_argument("--vocab-size", type=int, default=64000, help="SentencePiece pieces (default 64000)")
    train.add_argument("--out", required=True, help="the .model file to write")
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument(
        "--character-coverage", type=float, default=0.9999, help="share of characters covered (default 0.9999)"
    )
    train.add_argument(
        "--byte-fallback",
        action="store_true",
        help="uncovered characters as byte pieces instead of <unk> (not read by transformers' XLM-R tokenizer)",
    )
    train.add_argument(
        "--max-sentences", type=int, default=5_000_000, help="sentences sampled for training (default 5M)"
    )
    train.add_argument("--max-documents", type=int, help="documents read per corpus at most (default: all)")
    train.add_argument("--seed", type=int, default=0, help="shard order and sentence sample")
    train.add_argument("--threads", type=int, help="SentencePiece threads (default: all cores)")
    train.add_argument(
        "--placeholders",
        action="store_true",
        help="when the text supports fewer pieces than --vocab-size, learn those and fill the rest with "
        "placeholder pieces that encoding never produces (a tokenizer of a given size from a small "
        "corpus, e.g. the sample's at the paper's 64000, to try a config end to end)",
    )
    train.add_argument("--json", action="store_true", help="print one JSON object")
    train.set_defaults(handler=_train)

    inspect = commands.add_parser("inspect", help="size, special ids and a few encodings of a tokenizer")
    inspect.add_argument("model", help="SentencePiece .model file")
    inspect.add_argument("--text", action="append", help="a text to encode (repeatable; default: examples)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=_inspect)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kosmos.config import ConfigError
    from kosmos.data.inspection import corpus_locations
    from kosmos.tokenizer import TokenizerError
    from kosmos.tokenizer.training import placeholder_count, sample_sentences, train_sentencepiece

    for name in ("vocab_size", "max_sentences", "max_documents", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1")
    if not 0 < args.character_coverage <= 1:
        raise ConfigError("--character-coverage: must be in (0, 1]")
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; choose another")
    folders: list = []
    for corpus in args.corpus:  # a corpus (folder, URL or its index), or a local folder of corpora
        folders += corpus_locations(corpus.removesuffix("index.json").rstrip("/") or ".").values()
    sentences, report = sample_sentences(folders, args.max_sentences, args.max_documents, args.seed)
    if not sentences:
        raise ConfigError(f"--corpus: no text in {', '.join(map(str, folders))} (skipped: {report.skipped})")
    try:
        tokenizer = train_sentencepiece(
            sentences,
            out,
            args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            threads=args.threads,
            placeholders=args.placeholders,
        )
    except TokenizerError as error:
        hint = "" if args.placeholders else " (or --placeholders to fill the rest with placeholder pieces)"
        raise ConfigError(f"--vocab-size: {error}{hint}") from None
    placeholders = placeholder_count(tokenizer)
    summary = {
        "out": str(out),
        "pieces": tokenizer.num_pieces,
        "placeholders": placeholders,
        "vocab_size": tokenizer.vocab_size,
        "documents": report.documents,
        "skipped": report.skipped,
        "sentences_seen": report.sentences_seen,
        "sentences_used": report.sentences_used,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{out}: {tokenizer.num_pieces} pieces"
            + (f" ({placeholders:,} of them placeholders)" if placeholders else "")
            + f", vocabulary {tokenizer.vocab_size}; trained on "
            f"{report.sentences_used:,} of {report.sentences_seen:,} sentences from "
            f"{sum(report.documents.values()):,} documents (skipped: {report.skipped or 'none'})"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kosmos.config import ConfigError
    from kosmos.tokenizer import Tokenizer, TokenizerError
    from kosmos.tokenizer.training import model_settings

    try:
        tokenizer = Tokenizer(args.model)
    except TokenizerError as error:
        raise ConfigError(str(error)) from None
    specials = {"<s>": tokenizer.bos_id, "<pad>": tokenizer.pad_id, "</s>": tokenizer.eos_id}
    specials |= {"<unk>": tokenizer.unk_id, **tokenizer.special_ids}
    encodings = []
    for text in args.text or EXAMPLES:
        ids = tokenizer.encode(text)
        pieces = [tokenizer.piece(i) for i in ids]
        encodings.append({"text": text, "ids": ids, "pieces": pieces, "decoded": tokenizer.decode(ids)})
    report = {
        "model": str(args.model),
        "pieces": tokenizer.num_pieces,
        "vocab_size": tokenizer.vocab_size,
        "settings": model_settings(tokenizer),
        "special_ids": specials,
        "encodings": encodings,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model}: {tokenizer.num_pieces} pieces, vocabulary {tokenizer.vocab_size} (fairseq layout)")
    print("settings: " + ", ".join(f"{k} {v}" for k, v in report["settings"].items()))
    print("special ids: " + ", ".join(f"{name} {i}" for name, i in specials.items()))
    for encoding in encodings:
        print(f"\n{encoding['text']!r}")
        print(f"  ids    {encoding['ids']}")
        print(f"  pieces {' '.join(encoding['pieces'])}")
    return 0
