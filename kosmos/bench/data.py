"""`kosmos bench data`: the training loader (tokenizing, CLIP preprocessing, packing, its workers)
against a bare loop that only reads the same shards and decodes and resizes their images."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

from kosmos.cli import non_negative_int, positive_int
from kosmos.threads import available_cores, configure_threads


def register(benches: argparse._SubParsersAction) -> None:
    data = benches.add_parser("data", help="the data loader against a bare decode-and-resize loop")
    data.add_argument(
        "--config", required=True, help="training YAML (its model, tokenizer and data sections)"
    )
    data.add_argument("--steps", type=positive_int, default=20, help="timed optimizer steps of data (default 20)")
    data.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (worker start-up)")
    data.add_argument("--json", action="store_true", help="print one JSON object")
    data.add_argument(
        "--serve", choices=("http", "s3"), help="read the corpora through a local HTTP or S3 server (127.0.0.1)"
    )
    data.add_argument("overrides", nargs="*", help="config overrides, e.g. data.num_workers=0")
    data.set_defaults(handler=bench_data)


def bench_data(args: argparse.Namespace) -> int:
    from kosmos.data import build_loader
    from kosmos.data.serve import serve_corpora
    from kosmos.tokenizer import Tokenizer
    from kosmos.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    configure_threads(cfg.data.num_workers, cfg.train.threads)
    tokenizer = Tokenizer(cfg.tokenizer)
    image_size = cfg.model.vision.image_size
    samples: Counter[str] = Counter()
    tokens = images = 0
    with serve_corpora(cfg.data, args.serve) as data:
        loader = build_loader(data, tokenizer, image_size, cfg.model.connector.num_queries)
        steps = iter(loader)
        for _ in range(args.warmup):
            next(steps)
        start = time.perf_counter()
        for _ in range(args.steps):
            for batch in next(steps):
                tokens += int((batch.segment_ids > 0).sum())
                images += len(batch.images)
            samples.update(ref.corpus for ref in loader.last_step_samples)
        loader_seconds = time.perf_counter() - start
        del steps  # stops the loader's workers before the bare loop runs

    start = time.perf_counter()
    bare_images = sum(
        bare_decode_and_resize(Path(corpus.path), samples[corpus.name], image_size)
        for corpus in cfg.data.corpora
    )
    bare_seconds = time.perf_counter() - start

    total = sum(samples.values())
    report = {
        "benchmark": "data",
        "config": str(args.config),
        "machine": f"{platform.machine()} CPU, {available_cores()} cores",
        "num_workers": cfg.data.num_workers,
        "source": args.serve or "local",
        "steps": args.steps,
        "samples": dict(samples),
        "loader": _rates(total, tokens, images, loader_seconds),
        # Same number of samples from each corpus; tokens are the loader's, i.e. the rate the loader
        # would reach if tokenizing and packing were free.
        "bare": _rates(total, tokens, bare_images, bare_seconds),
    }
    report["loader_vs_bare"] = round(report["loader"]["samples_per_s"] / report["bare"]["samples_per_s"], 3)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{report['machine']}, num_workers={cfg.data.num_workers}, {args.steps} steps, samples {dict(samples)}"
    )
    print(f"{'':>8} {'seconds':>9} {'samples/s':>10} {'tokens/s':>10} {'images/s':>9}")
    for name in ("loader", "bare"):
        r = report[name]
        print(
            f"{name:>8} {r['seconds']:>9.2f} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} {r['images_per_s']:>9.1f}"
        )
    print(f"loader / bare samples/s: {report['loader_vs_bare']:.2f}")
    return 0


def bare_decode_and_resize(folder: Path, num_samples: int, image_size: int) -> int:
    """Read `num_samples` samples of a corpus in shard order (cycling), decode text and JSON, decode
    and CLIP-resize images; nothing else. Returns the number of images."""
    from kosmos.data.decode import decode_image, image_transform
    from kosmos.data.shards import IMAGE_EXTENSIONS, read_index, read_samples

    transform = image_transform(image_size)
    shards = [shard.name for shard in read_index(folder).shards]
    seen, images = 0, 0
    while seen < num_samples:
        for name in shards:
            with open(folder / name, "rb") as file:
                for sample in read_samples(file, name):
                    if seen == num_samples:
                        return images
                    seen += 1
                    for suffix, data in sample.members.items():
                        extension = suffix.rsplit(".", 1)[-1]
                        if extension in IMAGE_EXTENSIONS:
                            transform(decode_image(data))
                            images += 1
                        elif extension == "json":
                            json.loads(data)
                        else:
                            data.decode("utf-8")
    return images


def _rates(samples: int, tokens: int, images: int, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "images_per_s": round(images / seconds, 2),
    }
