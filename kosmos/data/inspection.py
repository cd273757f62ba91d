"""`kosmos data inspect`: read a corpus the way the loader does and count what it finds.

Every sample is decoded with the loader's decoders and default limits (images under 64x64 dropped,
at most 5 per interleaved document), so the skip counts are the ones training will meet, plus those
the builder already counted in the index.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from kosmos.config import ConfigError
from kosmos.data import sources
from kosmos.data.config import INDEX_FILE, CorpusConfig
from kosmos.data.decode import DECODERS
from kosmos.data.shards import ShardReader, read_index
from kosmos.data.skips import Reason, SkipSample
from kosmos.data.stream import encode_document
from kosmos.tokenizer import Tokenizer


def corpus_folders(folder: Path) -> dict[str, Path]:
    """The corpus at `folder`, or the corpora in its subfolders (e.g. the sample corpus's root)."""
    if (folder / INDEX_FILE).is_file():
        return {folder.name: folder}
    found = {p.parent.name: p.parent for p in sorted(folder.glob(f"*/{INDEX_FILE}"))}
    if not found:
        raise ConfigError(f"{folder}: no corpus index ({INDEX_FILE}) here or in its subfolders")
    return found


def inspect_corpus(folder: Path, tokenizer: Tokenizer | None) -> dict:
    """Counts for one corpus folder. `tokens` (image slots not counted) needs a tokenizer."""
    index = read_index(folder)
    corpus = CorpusConfig(kind=index.kind, path=str(folder), tokens_per_step=1)
    decode = DECODERS[index.kind]
    skipped: Counter[str] = Counter(index.skipped)
    dropped: Counter[str] = Counter()
    samples = images = tokens = 0
    # Every sample is decoded: a bar where a terminal watches.
    bar = tqdm(total=index.num_samples, unit="sample", desc=f"kosmos data inspect: {folder.name}", disable=None)
    for shard in index.shards:
        try:
            reader = ShardReader(sources.local_path(index.location(shard.name)))
        except sources.ShardUnreadable as error:
            skipped[error.reason] += shard.samples
            bar.update(shard.samples)
            continue
        except (OSError, tarfile.TarError):
            skipped[Reason.UNREADABLE_SHARD] += shard.samples
            bar.update(shard.samples)
            continue
        for i in range(shard.samples):
            bar.update(1)
            try:
                document = decode(reader.read(i), corpus)
                if tokenizer is not None:
                    tokens += len(encode_document(document, tokenizer, num_image_tokens=0))
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            samples += 1
            images += sum(not isinstance(part, str) for part in document.parts)
            dropped.update(document.dropped_images)
        reader.close()
    bar.close()
    return {
        "kind": index.kind,
        "shards": len(index.shards),
        "indexed": index.num_samples,
        "samples": samples,
        "tokens": tokens if tokenizer is not None else None,
        "images": images,
        "skipped": dict(sorted(skipped.items())),
        "dropped_images": dict(sorted(dropped.items())),
    }


def inspect(folder: str | Path, tokenizer: Tokenizer | None = None) -> dict:
    """Totals over the corpora at `folder`, with each corpus under `corpora`."""
    corpora = {name: inspect_corpus(path, tokenizer) for name, path in corpus_folders(Path(folder)).items()}
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for report in corpora.values():
        skipped.update(report["skipped"])
        dropped.update(report["dropped_images"])
    return {
        "shards": sum(r["shards"] for r in corpora.values()),
        "samples": sum(r["samples"] for r in corpora.values()),
        "tokens": sum(r["tokens"] for r in corpora.values()) if tokenizer is not None else None,
        "images": sum(r["images"] for r in corpora.values()),
        "skipped": dict(sorted(skipped.items())),
        "dropped_images": dict(sorted(dropped.items())),
        "corpora": corpora,
    }
