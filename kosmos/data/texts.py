"""The text of a corpus, document by document, without decoding any image.

Text documents give their text, caption pairs their caption, interleaved documents and instruction
triples their text parts in reading order. Shards are visited in a seeded shuffle and each is read
from its start to its end, local or remote, by the walk training reads with (`walk_corpus`: sequential
reads suit object stores), a folder or URL prefix of shards without an index too; `max_documents` stops early, so a bounded sample of a huge corpus reads
only as many shards as it needs. Unusable samples are counted by reason, as the loader counts them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kosmos.data import sources
from kosmos.data.config import CorpusConfig
from kosmos.data.indexer import listed_index
from kosmos.data.skips import Counts, Reason, SkipSample
from kosmos.data.stream import LazyCache, ShardOpener, shuffled, usable_document, walk_corpus


def corpus_texts(
    location: str | Path, skipped: Counts, max_documents: int | None = None, seed: int = 0
) -> Iterator[list[str]]:
    """The text parts of each usable document of the corpus at `location` (a folder or URL, as a
    training config names it, or a plain folder or URL prefix of shards); skips are added to
    `skipped`."""
    location = str(location)
    index = listed_index(location)
    name = location.rstrip("/").rsplit("/", 1)[-1]
    # No image is kept (and so none is decoded): at most zero images per document; a caption pair's
    # text is its caption, read as a text document.
    kind = "text" if index.kind == "caption" else index.kind
    corpus = CorpusConfig(kind=kind, path=location, tokens_per_step=1, max_images=0)
    cache = LazyCache(None, sources.DEFAULT_OPTIONS)
    documents = 0
    order = shuffled(len(index.shards), seed, name)
    # Shards listed without an index have no counts: each is read to its end.
    walk = walk_corpus(name, index, ShardOpener(index, cache), order, counted=index.num_samples > 0)
    try:
        for _, raw, extra in walk:
            if extra:
                skipped[Reason.SHARD_LONGER_THAN_INDEX] += extra
            if documents == max_documents:
                return
            try:
                document, _ = usable_document(raw, corpus, None, 0, None)
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            documents += 1
            yield [part for part in document.parts if isinstance(part, str)]
    finally:
        walk.close()
        cache.close()
