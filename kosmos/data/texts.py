"""The text of a corpus, document by document, without decoding any image.

Text documents give their text, caption pairs their caption, interleaved documents and instruction
triples their text parts in reading order. Shards are visited in a seeded shuffle and each is read
from its start to its end (sequential reads suit object stores); `max_documents` stops early, so a
bounded sample of a huge corpus reads only as many shards as it needs. Unusable samples are counted
by reason, as the loader counts them.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from kosmos.data.config import CorpusConfig
from kosmos.data.decode import DECODERS
from kosmos.data.shards import ShardReader, SkipSample, read_index
from kosmos.data.stream import shuffled


def corpus_texts(
    folder: str | Path, skipped: Counter[str], max_documents: int | None = None, seed: int = 0
) -> Iterator[list[str]]:
    """The text parts of each usable document of the corpus at `folder`; skips are added to `skipped`."""
    folder = Path(folder)
    index = read_index(folder)
    # No image is kept (and so none is decoded): at most zero images per document.
    corpus = CorpusConfig(kind=index.kind, path=str(folder), tokens_per_step=1, max_images=0)
    # A caption pair's text is its caption, read without its image.
    decode = DECODERS["text" if index.kind == "caption" else index.kind]
    documents = 0
    for shard_number in shuffled(len(index.shards), seed, folder.name):
        shard = index.shards[shard_number]
        try:
            reader = ShardReader(folder / shard.name)
        except (OSError, tarfile.TarError):
            skipped["unreadable_shard"] += shard.samples
            continue
        try:
            for i in range(shard.samples):
                if documents == max_documents:
                    return
                try:
                    document = decode(reader.read(i), corpus)
                except SkipSample as skip:
                    skipped[skip.reason] += 1
                    continue
                documents += 1
                yield [part for part in document.parts if isinstance(part, str)]
        finally:
            reader.close()
