"""One stream's share of a corpus, epoch after epoch, as encoded documents ready to pack.

Epoch order: epoch e visits the corpus's shards in a seeded shuffle and each shard's samples in a
seeded shuffle, both drawn from (seed, corpus name, epoch) and so the same on every rank. Laid end to
end that is one sequence of the corpus's N samples. With S streams (ranks x loader workers), stream s
reads the contiguous slice [s*N//S, (s+1)*N//S) of it: slices are disjoint and cover the epoch, so
every sample is read exactly once per epoch, and a stream's whole position is (epoch, index in its
slice). Nothing random is carried between calls: the order is recomputed from the seed.
"""

from __future__ import annotations

import bisect
import itertools
import random
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from kosmos.data.config import CorpusConfig
from kosmos.data.decode import DECODERS, SPLITTABLE_KINDS, Document
from kosmos.data.shards import CorpusIndex, ShardReader, SkipSample
from kosmos.tokenizer import Encoded, Tokenizer


class DataError(RuntimeError):
    """A corpus cannot feed training (e.g. a whole epoch of a stream held no usable sample)."""


class SampleRef(NamedTuple):
    """Which sample: its shard and index there (the n-th key group of the tar), in which epoch."""

    corpus: str
    epoch: int
    shard: str
    index: int

    def __str__(self) -> str:
        return f"{self.corpus}/{self.shard}#{self.index}@{self.epoch}"


@dataclass
class EncodedDocument:
    ref: SampleRef
    position: int  # in its stream's slice of epoch `ref.epoch`
    ids: torch.Tensor  # [T] long
    image_mask: torch.Tensor  # [T] bool
    labels: torch.Tensor  # [T] long, shifted, -100 where nothing is learned
    images: torch.Tensor  # [n, 3, H, W]
    image_starts: list[int]  # position of each image's `<image>` token
    dropped_images: Counter[str]

    def __len__(self) -> int:
        return len(self.ids)

    def images_between(self, start: int, end: int) -> torch.Tensor:
        """The images whose blocks lie in [start, end) (blocks are never cut)."""
        first = bisect.bisect_left(self.image_starts, start)
        return self.images[first : bisect.bisect_left(self.image_starts, end)]


def encode_document(document: Document, tokenizer: Tokenizer, num_image_tokens: int) -> Encoded:
    """The document's token layout; text that tokenizes to nothing skips it (`no_tokens`)."""
    encoded = tokenizer.encode_interleaved(document.parts, num_image_tokens, learn=document.learn)
    markers = 2 + 2 * encoded.num_images  # <s>, </s>, and <image>, </image> around each image
    if len(encoded) - sum(encoded.image_mask) - markers <= 0:
        raise SkipSample("no_tokens")
    return encoded


def shuffled(n: int, *seed_parts: object) -> list[int]:
    order = list(range(n))
    random.Random(":".join(map(str, seed_parts))).shuffle(order)
    return order


def stream_slice(num_samples: int, stream: int, num_streams: int) -> tuple[int, int]:
    return num_samples * stream // num_streams, num_samples * (stream + 1) // num_streams


class CorpusStream:
    """Reads stream `stream` of `num_streams` of a corpus: decodes, preprocesses and tokenizes."""

    def __init__(
        self,
        corpus: CorpusConfig,
        index: CorpusIndex,
        tokenizer: Tokenizer,
        transform: Callable[[Image.Image], torch.Tensor],
        image_size: int,
        num_image_tokens: int,
        seq_len: int,
        seed: int,
        stream: int,
        num_streams: int,
    ):
        self.corpus = corpus
        self.index = index
        self.tokenizer = tokenizer
        self.transform = transform
        self.no_images = torch.empty(0, 3, image_size, image_size)
        self.num_image_tokens = num_image_tokens
        self.seq_len = seq_len
        self.seed = seed
        self.decode = DECODERS[corpus.kind]
        self.slice_start, self.slice_end = stream_slice(index.num_samples, stream, num_streams)
        self.epoch = 0
        self.position = 0
        self.skipped: Counter[str] = Counter()
        self.dropped_images: Counter[str] = Counter()
        # Skipped samples since the last `take_skips()`, for tracing them back.
        self.skip_log: list[tuple[SampleRef, str]] = []
        self._order_epoch: int | None = None
        self._shard_order: list[int] = []
        self._shard_starts: list[int] = []
        self._sample_order: tuple[tuple[int, int], list[int]] | None = None  # ((shard, epoch), order)
        self._reader: tuple[str, ShardReader | None, str] | None = None  # shard, reader, why unreadable

    # -- reading --------------------------------------------------------------------------------

    def next_document(self) -> EncodedDocument:
        """The next usable document; unusable samples on the way are counted and logged."""
        misses = 0
        while True:
            epoch, position = self.epoch, self.position
            ref = self._ref(epoch, position)
            self.position += 1
            if self.position == self.slice_end - self.slice_start:
                self.epoch, self.position = self.epoch + 1, 0
            try:
                document = self._read(ref, position)
            except SkipSample as skip:
                self.skipped[skip.reason] += 1
                self.skip_log.append((ref, skip.reason))
                misses += 1
                if misses >= 2 * (self.slice_end - self.slice_start):  # then a whole epoch was unusable
                    raise DataError(
                        f"corpus {self.corpus.name} ({self.corpus.path}): a whole epoch of this stream's "
                        f"samples was unusable (last: {ref}: {skip})"
                    ) from None
                continue
            self.dropped_images.update(document.dropped_images)
            return document

    def take_skips(self) -> list[tuple[SampleRef, str]]:
        skips, self.skip_log = self.skip_log, []
        return skips

    def _ref(self, epoch: int, position: int) -> SampleRef:
        """The sample at `position` of this stream's slice of the epoch's order."""
        if self._order_epoch != epoch:
            self._shard_order = shuffled(len(self.index.shards), self.seed, self.corpus.name, epoch)
            counts = [self.index.shards[k].samples for k in self._shard_order]
            self._shard_starts = [0, *itertools.accumulate(counts)][:-1]
            self._order_epoch = epoch
        at = self.slice_start + position
        slot = bisect.bisect_right(self._shard_starts, at) - 1
        shard = self._shard_order[slot]
        info = self.index.shards[shard]
        if self._sample_order is None or self._sample_order[0] != (shard, epoch):
            self._sample_order = (
                (shard, epoch),
                shuffled(info.samples, self.seed, self.corpus.name, epoch, info.name),
            )
        return SampleRef(
            self.corpus.name, epoch, info.name, self._sample_order[1][at - self._shard_starts[slot]]
        )

    def _open(self, shard: str) -> ShardReader:
        if self._reader is None or self._reader[0] != shard:
            self.close()
            try:
                self._reader = (shard, ShardReader(Path(self.corpus.path) / shard), "")
            except (OSError, tarfile.TarError) as error:
                self._reader = (shard, None, f"{type(error).__name__}: {error}")
        _, reader, error = self._reader
        if reader is None:
            raise SkipSample("unreadable_shard", f"{self.corpus.path}/{shard}: {error}")
        return reader

    def _read(self, ref: SampleRef, position: int) -> EncodedDocument:
        document = self.decode(self._open(ref.shard).read(ref.index), self.corpus)
        encoded = encode_document(document, self.tokenizer, self.num_image_tokens)
        if self.corpus.kind not in SPLITTABLE_KINDS and len(encoded) > self.seq_len:
            raise SkipSample("too_long", f"{len(encoded)} tokens")
        images = [self.transform(p) for p in document.parts if isinstance(p, Image.Image)]
        ids = torch.tensor(encoded.ids, dtype=torch.long)
        return EncodedDocument(
            ref=ref,
            position=position,
            ids=ids,
            image_mask=torch.tensor(encoded.image_mask, dtype=torch.bool),
            labels=torch.tensor(encoded.labels(), dtype=torch.long),
            images=torch.stack(images) if images else self.no_images,
            image_starts=(ids == self.tokenizer.boi_id).nonzero().flatten().tolist(),
            dropped_images=document.dropped_images,
        )

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self, unread: EncodedDocument | None = None) -> dict:
        """The stream's position and counters; with `unread`, as if that document (the last one read)
        had not been read yet, so that a restored stream reads it again."""
        epoch, position, dropped = self.epoch, self.position, Counter(self.dropped_images)
        if unread is not None:
            epoch, position = unread.ref.epoch, unread.position
            dropped.subtract(unread.dropped_images)
        return {
            "epoch": epoch,
            "position": position,
            "skipped": dict(self.skipped),
            "dropped_images": {k: v for k, v in dropped.items() if v},
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = Counter(state["skipped"])
        self.dropped_images = Counter(state["dropped_images"])

    def close(self) -> None:
        if self._reader is not None and self._reader[1] is not None:
            self._reader[1].close()
        self._reader = None
