"""The text of a corpus, document by document, without decoding any image.

Text documents give their text, caption pairs their caption, interleaved documents and instruction
triples their text parts in reading order. Shards are visited in a seeded shuffle and each is read
from its start to its end, local or remote, as the loader reads them (sequential reads suit object
stores); `max_documents` stops early, so a bounded sample of a huge corpus reads only as many shards
as it needs. Unusable samples are counted
by reason, as the loader counts them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kosmos.data import sources
from kosmos.data.config import CorpusConfig
from kosmos.data.decode import DECODERS
from kosmos.data.indexer import listed_index
from kosmos.data.shards import ShardDamaged, read_samples
from kosmos.data.skips import Counts, Reason, SkipSample
from kosmos.data.stream import ShardOpener, shuffled


def corpus_texts(
    location: str | Path, skipped: Counts, max_documents: int | None = None, seed: int = 0
) -> Iterator[list[str]]:
    """The text parts of each usable document of the corpus at `location` (a folder or URL, as a
    training config names it, or a plain folder or URL prefix of shards); skips are added to
    `skipped`."""
    location = str(location)
    index = listed_index(location)
    # No image is kept (and so none is decoded): at most zero images per document.
    corpus = CorpusConfig(kind=index.kind, path=location, tokens_per_step=1, max_images=0)
    # A caption pair's text is its caption, read without its image.
    decode = DECODERS["text" if index.kind == "caption" else index.kind]
    cache: list[sources.ShardCache] = []

    def shard_cache() -> sources.ShardCache:
        if not cache:
            cache.append(sources.ShardCache(None, sources.DEFAULT_OPTIONS))
        return cache[0]

    opener = ShardOpener(index, shard_cache)
    documents = 0
    try:
        for shard_number in shuffled(len(index.shards), seed, location.rstrip("/").rsplit("/", 1)[-1]):
            shard = index.shards[shard_number]
            read = 0
            try:
                with opener.open(shard.name) as file:
                    for sample in read_samples(file, shard.name):
                        if documents == max_documents:
                            return
                        read += 1
                        try:
                            document = decode(sample, corpus)
                        except SkipSample as skip:
                            skipped[skip.reason] += 1
                            continue
                        documents += 1
                        yield [part for part in document.parts if isinstance(part, str)]
            except sources.ShardUnreadable as error:
                sources.warn(f"{location}: shard {shard.name} skipped ({error})")
                skipped[error.reason] += max(0, shard.samples - read)
            except ShardDamaged:
                skipped[Reason.TRUNCATED_SHARD] += max(0, shard.samples - read)
    finally:
        for each in cache:
            each.close()
