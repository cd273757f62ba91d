"""`kosmos data inspect`: read a corpus the way the loader does and count what it finds.

A corpus, local or remote (any location of `sources.py`), is walked as a training epoch reads it
(`walk_corpus`: the same shard reader, decompression, sources and skip rules), and every sample is
decoded with the loader's decoders and default limits (images under 64x64 dropped, at most 5 per
interleaved document), so the skip counts are the ones an epoch of training meets, plus those the
builder already counted in the index. Two depend on a training config and are not counted here:
`too_long` (its `seq_len`) and `held_out` (its validation share); `no_tokens` needs a tokenizer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tqdm import tqdm

from kosmos.config import ConfigError
from kosmos.data import sources
from kosmos.data.config import INDEX_FILE, CorpusConfig
from kosmos.data.shards import read_index
from kosmos.data.skips import Counts, Reason, SkipSample, saved
from kosmos.data.stream import LazyCache, ShardOpener, usable_document, walk_corpus
from kosmos.tokenizer import Tokenizer


def corpus_locations(location: str) -> dict[str, str]:
    """The corpus at `location` (a remote one is read where it lies), or the corpora in the subfolders
    of a local folder (e.g. the sample corpus's root), by name."""
    location = location.rstrip("/")
    if not sources.is_local(location) or (Path(sources.local_path(location)) / INDEX_FILE).is_file():
        return {location.rsplit("/", 1)[-1]: location}
    found = {
        p.parent.name: str(p.parent) for p in sorted(Path(sources.local_path(location)).glob(f"*/{INDEX_FILE}"))
    }
    if not found:
        raise ConfigError(f"{location}: no corpus index ({INDEX_FILE}) here or in its subfolders")
    return found


def inspect_corpus(name: str, location: str, tokenizer: Tokenizer | None) -> dict:
    """Counts for one corpus. `tokens` (image slots not counted) needs a tokenizer."""
    index = read_index(location)
    corpus = CorpusConfig(kind=index.kind, path=location, tokens_per_step=1)
    skipped: Counts = Counter(index.skipped)
    dropped: Counts = Counter()
    samples = images = tokens = 0
    # Every sample is decoded: a bar where a terminal watches.
    bar = tqdm(total=index.num_samples, unit="sample", desc=f"kosmos data inspect: {name}", disable=None)
    cache = LazyCache(None, sources.DEFAULT_OPTIONS)
    walk = walk_corpus(name, index, ShardOpener(index, cache))
    try:
        for _, raw, extra in walk:
            bar.update(1)
            if extra:
                skipped[Reason.SHARD_LONGER_THAN_INDEX] += extra
            try:
                document, encoded = usable_document(raw, corpus, tokenizer, num_image_tokens=0, seq_len=None)
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            samples += 1
            tokens += len(encoded) if encoded is not None else 0
            images += sum(not isinstance(part, str) for part in document.parts)
            dropped.update(document.dropped_images)
    finally:
        walk.close()
        cache.close()
        bar.close()
    return {
        "kind": index.kind,
        "shards": len(index.shards),
        "indexed": index.num_samples,
        "samples": samples,
        "tokens": tokens if tokenizer is not None else None,
        "images": images,
        "skipped": saved(skipped),
        "dropped_images": saved(dropped),
    }


def inspect(location: str | Path, tokenizer: Tokenizer | None = None) -> dict:
    """Totals over the corpora at `location` (a folder or URL), with each corpus under `corpora`."""
    corpora = {
        name: inspect_corpus(name, path, tokenizer) for name, path in corpus_locations(str(location)).items()
    }
    skipped: Counts = Counter()
    dropped: Counts = Counter()
    for report in corpora.values():
        skipped.update(report["skipped"])
        dropped.update(report["dropped_images"])
    return {
        "shards": sum(r["shards"] for r in corpora.values()),
        "samples": sum(r["samples"] for r in corpora.values()),
        "tokens": sum(r["tokens"] for r in corpora.values()) if tokenizer is not None else None,
        "images": sum(r["images"] for r in corpora.values()),
        "skipped": saved(skipped),
        "dropped_images": saved(dropped),
        "corpora": corpora,
    }
