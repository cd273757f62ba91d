"""A corpus's epochs split into virtual streams, each read sequentially, as encoded documents ready to pack.

Epoch order: epoch e lays the corpus's shards end to end in a shuffle seeded by (seed, corpus name, e),
each shard's samples in file order: one sequence of the corpus's N samples. With V virtual streams,
stream v owns the contiguous slice [v*N//V, (v+1)*N//V) of it: slices are disjoint and cover the
epoch, so every sample is read exactly once per epoch.

Within its slice, a virtual stream reads `spans` parts ("lanes", each a run of shard spans) at once,
taking one sample of each in turn, and serves every window of `window` samples of that interleaved
sequence in a shuffle seeded by (seed, corpus, e, v, window number): a window mixes samples of about
`spans` shards, and every shard is still read front to back, in one pass. A stream's whole position is
(epoch, position in its slice); the order is recomputed from the seed, so nothing random is carried,
and a restored stream re-reads at most the window it was in.

A physical stream (one loader worker of one rank) serves a block of virtual streams, one document
from each in turn (`CorpusStream`). Index counts are claims: a shard that ends early has its missing
samples counted (`shard_shorter_than_index`); one that holds more has the rest counted
(`shard_longer_than_index`) by whoever reads its last counted sample.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import BinaryIO, NamedTuple

import torch
from PIL import Image

from kosmos.data import sources
from kosmos.data.config import CorpusConfig, DataConfig
from kosmos.data.decode import DECODERS, SPLITTABLE_KINDS, Document
from kosmos.data.holdout import Holdout
from kosmos.data.shards import CorpusIndex, RawSample, ShardDamaged, read_samples
from kosmos.data.skips import DELIBERATE_REASONS, SHARD_REASONS, Counts, Reason, SkipSample, saved
from kosmos.data.state import CorpusState, VirtualState
from kosmos.tokenizer import Encoded, Tokenizer

# The skip-fraction rule judges a stream only once it has tried this many samples, and this many
# shards' worth: fewer say more about which shards it met than about the corpus.
MIN_TRIED_FOR_FRACTION = 1000
MIN_SHARDS_FOR_FRACTION = 8


class DataError(RuntimeError):
    """A corpus can no longer feed training (every shard a stream reaches is unusable, or too many skips)."""


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
    stream: int  # the virtual stream it came from
    position: int  # in that stream's slice of epoch `ref.epoch`
    ids: torch.Tensor  # [T] long
    image_mask: torch.Tensor  # [T] bool
    labels: torch.Tensor  # [T] long, shifted, -100 where nothing is learned
    images: torch.Tensor  # [n, 3, H, W]
    image_starts: list[int]  # position of each image's `<image>` token
    dropped_images: Counts
    # Skips counted when this document was read (a shard's samples beyond its index count).
    counted: Counts = field(default_factory=Counter)

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
        raise SkipSample(Reason.NO_TOKENS)
    return encoded


def usable_document(
    raw: RawSample | SkipSample,
    corpus: CorpusConfig,
    tokenizer: Tokenizer | None,
    num_image_tokens: int,
    seq_len: int | None,
) -> tuple[Document, Encoded | None]:
    """The document a sample holds and, given a tokenizer, its token layout; `SkipSample` when
    training would not use it (`too_long` only when `seq_len` is given)."""
    if isinstance(raw, SkipSample):
        raise raw
    if raw.problem is not None:
        raise raw.problem
    document = DECODERS[corpus.kind](raw, corpus)
    if tokenizer is None:
        return document, None
    encoded = encode_document(document, tokenizer, num_image_tokens)
    if seq_len is not None and corpus.kind not in SPLITTABLE_KINDS and len(encoded) > seq_len:
        raise SkipSample(Reason.TOO_LONG, f"{len(encoded)} tokens")
    return document, encoded


def shuffled(n: int, *seed_parts: object) -> list[int]:
    order = list(range(n))
    random.Random(":".join(map(str, seed_parts))).shuffle(order)
    return order


def stream_slice(num_samples: int, stream: int, num_streams: int) -> tuple[int, int]:
    return num_samples * stream // num_streams, num_samples * (stream + 1) // num_streams


def stream_block(physical: int, num_physical: int, num_virtual: int) -> range:
    """The virtual streams physical stream `physical` of `num_physical` serves."""
    return range(physical * num_virtual // num_physical, (physical + 1) * num_virtual // num_physical)


class EpochPlan:
    """Epoch `epoch` of virtual stream `stream`: which sample each position of its slice holds."""

    def __init__(
        self,
        index: CorpusIndex,
        seed: int,
        name: str,
        epoch: int,
        stream: int,
        num_streams: int,
        spans: int,
        window: int,
    ):
        self.epoch = epoch
        self.shards = shuffled(len(index.shards), seed, name, epoch)
        self.starts = [0, *itertools.accumulate(index.shards[k].samples for k in self.shards)]
        first, end = stream_slice(self.starts[-1], stream, num_streams)
        self.length = end - first
        lanes = max(1, min(spans, self.length))
        self.lane_starts = [first + self.length * j // lanes for j in range(lanes + 1)]
        lengths = [b - a for a, b in itertools.pairwise(self.lane_starts)]
        self.short = min(lengths)
        self.long_lanes = [j for j, n in enumerate(lengths) if n > self.short]
        self.window = window
        self.seed_parts = (seed, name, epoch, stream)

    @property
    def lanes(self) -> int:
        return len(self.lane_starts) - 1

    def lane_sample(self, i: int) -> tuple[int, int]:
        """Lane and index in the lane of the i-th sample of the interleaved sequence."""
        if i < self.lanes * self.short:
            return i % self.lanes, i // self.lanes
        return self.long_lanes[i - self.lanes * self.short], self.short

    def locate(self, lane: int, k: int) -> tuple[int, int]:
        """The shard (its number in the index) and index in it of a lane's k-th sample."""
        at = self.lane_starts[lane] + k
        slot = bisect.bisect_right(self.starts, at) - 1
        return self.shards[slot], at - self.starts[slot]

    def lane_shards(self, lane: int, k: int, count: int) -> list[int]:
        """The shard (number in the index) holding the lane's k-th sample and up to `count` - 1 after it."""
        end = self.lane_starts[lane + 1]
        slot = bisect.bisect_right(self.starts, self.lane_starts[lane] + k) - 1
        slots = range(slot, min(slot + count, len(self.shards)))
        return [self.shards[s] for s in slots if self.starts[s] < min(end, self.starts[s + 1])]

    def window_range(self, w: int) -> range:
        return range(w * self.window, min(self.length, (w + 1) * self.window))

    def window_order(self, w: int) -> list[int]:
        """The interleaved indices of window w in the order they are served."""
        span = self.window_range(w)
        return [span.start + j for j in shuffled(len(span), *self.seed_parts, w)]


class LazyCache:
    """The cache of remote shards of one process, made when first needed: a process that reads only
    local shards never makes one."""

    def __init__(self, root: str | None, options: sources.ReadOptions):
        self.root, self.options = root, options
        self._cache: sources.ShardCache | None = None

    def __call__(self) -> sources.ShardCache:
        if self._cache is None:
            self._cache = sources.ShardCache(self.root, self.options)
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None


class ShardOpener:
    """Opens the shards of one corpus for a sequential read: local ones in place, remote ones through
    the process's cache; a shard that is not the version its index recorded is refused
    (`shard_changed`)."""

    def __init__(self, index: CorpusIndex, cache: LazyCache):
        self.index = index
        self.cache = cache
        self.versions = {shard.name: shard.version for shard in index.shards}

    def open(self, name: str) -> BinaryIO:
        location = self.index.location(name)
        if sources.is_local(location):
            return sources.open_local(location, self.versions.get(name))
        return self.cache().open(location, self.versions.get(name))

    def prefetch(self, name: str) -> None:
        try:
            location = self.index.location(name)
        except sources.ShardUnreadable:
            return
        if not sources.is_local(location):
            self.cache().prefetch(location, self.versions.get(name))


class LaneReader:
    """One lane's sequential read: one shard open at a time, samples in file order."""

    def __init__(self, corpus: str, index: CorpusIndex, opener: ShardOpener, failed: dict[int, SkipSample]):
        self.corpus = corpus
        self.index = index
        self.opener = opener
        self.failed = failed  # shards found unreadable this epoch, shared by the stream's lanes
        self.shard: int | None = None
        self.file: BinaryIO | None = None
        self.samples: Iterator[RawSample] = iter(())
        self.next_index = 0
        self.failure: SkipSample | None = None

    def read(self, shard: int, index: int) -> tuple[RawSample | SkipSample, int]:
        """Sample `index` of shard `shard`, or why it cannot be had; and, when it is the last sample the
        index counts, how many more samples the shard holds."""
        if self.shard != shard or index < self.next_index:
            self._open(shard)
        while self.failure is None and self.next_index < index:
            self._advance()
        sample = self.failure or self._advance()
        extra = 0
        if index == self.index.shards[shard].samples - 1 and self.failure is None:
            while not isinstance(self._advance(), SkipSample):
                extra += 1
            self.close()
        return sample, extra

    def read_to_end(self, shard: int) -> Iterator[RawSample | SkipSample]:
        """Every sample of shard `shard`, whatever its index count, then why it broke off if it did."""
        self._open(shard)
        while self.failure is None:
            sample = self._advance()
            if isinstance(sample, RawSample):
                yield sample
        if self.failure.reason != Reason.SHARD_SHORTER_THAN_INDEX:  # not merely its end
            yield self.failure
        self.close()

    def _open(self, shard: int) -> None:
        self.close()
        self.shard, self.next_index, self.failure = shard, 0, None
        name = self.index.shards[shard].name
        if shard in self.failed:
            self.failure = self.failed[shard]
            return
        try:
            self.file = self.opener.open(name)
            self.samples = read_samples(self.file, name)
        except sources.ShardUnreadable as error:
            self.failure = self.failed[shard] = SkipSample(error.reason, error.detail)
            sources.warn(
                f"corpus {self.corpus}: shard {name} skipped ({error.reason}), its "
                f"{self.index.shards[shard].samples} samples counted as {error.reason}: {error.detail}"
            )

    def _advance(self) -> RawSample | SkipSample:
        try:
            sample = next(self.samples)
        except StopIteration:
            info = self.index.shards[self.shard]
            self.failure = SkipSample(
                Reason.SHARD_SHORTER_THAN_INDEX,
                f"{info.name} holds {self.next_index} samples, the index says {info.samples}",
            )
            return self.failure
        except ShardDamaged as error:
            name = self.index.shards[self.shard].name
            if self.next_index == 0:  # not a tar stream at all
                self.failure = self.failed[self.shard] = SkipSample(Reason.UNREADABLE_SHARD, f"{name}: {error}")
                sources.warn(f"corpus {self.corpus}: shard {name} skipped (unreadable_shard): {error}")
            else:
                self.failure = SkipSample(Reason.TRUNCATED_SHARD, f"{name}: {error}")
            return self.failure
        self.next_index += 1
        return sample

    def close(self) -> None:
        if self.file is not None:
            self.samples = iter(())
            self.file.close()
            self.file = None
        self.shard = None


def walk_corpus(
    corpus: str,
    index: CorpusIndex,
    opener: ShardOpener,
    order: Iterable[int] | None = None,
    counted: bool = True,
) -> Iterator[tuple[SampleRef, RawSample | SkipSample, int]]:
    """Every sample the index counts, once, shard by shard (`order`: shard numbers, default the index's
    order), each front to back, read as a training epoch reads it: the sample or why it cannot be had,
    and, at a shard's last counted sample, how many more samples the shard holds. Not `counted` (shards
    listed without counts): every sample each shard holds, and where it breaks off."""
    lane = LaneReader(corpus, index, opener, failed={})
    try:
        for shard in range(len(index.shards)) if order is None else order:
            info = index.shards[shard]
            if not counted:
                for i, raw in enumerate(lane.read_to_end(shard)):
                    yield SampleRef(corpus, 0, info.name, i), raw, 0
                continue
            for i in range(info.samples):
                raw, extra = lane.read(shard, i)
                yield SampleRef(corpus, 0, info.name, i), raw, extra
    finally:
        lane.close()


class VirtualStream:
    """One virtual stream of a corpus: its position, its counters, and the window it is reading."""

    def __init__(
        self,
        name: str,
        index: CorpusIndex,
        seed: int,
        number: int,
        count: int,
        spans: int,
        window: int,
        opener: ShardOpener,
    ):
        self.name, self.index, self.seed = name, index, seed
        self.number, self.count, self.spans, self.window = number, count, spans, window
        self.opener = opener
        self.epoch = self.position = self.offset = self.tried = 0
        self.skipped: Counts = Counter()
        self.dropped_images: Counts = Counter()
        self._plan: EpochPlan | None = None
        self._lanes: list[LaneReader] = []
        self._window: tuple[int, int] | None = None  # (epoch, window number) of `_buffer`
        self._order: list[int] = []
        self._buffer: dict[int, tuple[SampleRef, RawSample | SkipSample, int]] = {}

    def _get_plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self.close()
            self._plan = EpochPlan(
                self.index, self.seed, self.name, epoch, self.number, self.count, self.spans, self.window
            )
            failed: dict[int, SkipSample] = {}
            self._lanes = [
                LaneReader(self.name, self.index, self.opener, failed) for _ in range(self._plan.lanes)
            ]
        return self._plan

    def next_raw(self) -> tuple[SampleRef, int, RawSample | SkipSample, int]:
        """The next sample of the stream (or why it cannot be had), its position, and the samples
        counted beyond its shard's index count."""
        plan = self._get_plan(self.epoch)
        w, position = self.position // plan.window, self.position
        if self._window != (self.epoch, w):
            self._fill(plan, w)
        ref, raw, extra = self._buffer.pop(self._order[position - w * plan.window])
        self.position += 1
        if self.position == plan.length:
            self.epoch, self.position = self.epoch + 1, 0
        return ref, position, raw, extra

    def _fill(self, plan: EpochPlan, w: int) -> None:
        """Read window w: each lane's next samples, in turn, so every lane reads front to back."""
        span = plan.window_range(w)
        for lane in range(plan.lanes):  # each lane's shard and the one after it
            for shard in plan.lane_shards(lane, span.start // plan.lanes, count=2):
                self.opener.prefetch(self.index.shards[shard].name)
        self._buffer = {}
        for i in span:
            lane, k = plan.lane_sample(i)
            shard, index = plan.locate(lane, k)
            raw, extra = self._lanes[lane].read(shard, index)
            self._buffer[i] = (
                SampleRef(self.name, plan.epoch, self.index.shards[shard].name, index),
                raw,
                extra,
            )
        self._order = plan.window_order(w)
        self._window = (plan.epoch, w)

    def state(self) -> VirtualState:
        return VirtualState(
            self.epoch, self.position, self.offset, self.tried, saved(self.skipped), saved(self.dropped_images)
        )

    def restore(self, state: VirtualState) -> None:
        self.epoch, self.position, self.offset, self.tried = state.epoch, state.position, state.offset, state.tried
        self.skipped = Counter(state.skipped)
        self.dropped_images = Counter(state.dropped_images)
        self._window = None

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()
        self._window, self._buffer = None, {}


@dataclass(frozen=True)
class ReadContext:
    """What every part of one loader reads with: the data config, the tokenizer, the image
    preprocessing and the model's image layout."""

    cfg: DataConfig
    tokenizer: Tokenizer
    transform: Callable[[Image.Image], torch.Tensor]
    image_size: int
    num_image_tokens: int


class CorpusStream:
    """A physical stream of a corpus: serves virtual streams `streams` (of `num_streams`) one usable
    document from each in turn, decoded, preprocessed and tokenized."""

    def __init__(
        self,
        context: ReadContext,
        corpus: CorpusConfig,
        index: CorpusIndex,
        streams: range,
        num_streams: int,
        opener: ShardOpener,
        holdout: Holdout | None = None,
    ):
        cfg = context.cfg
        self.context = context
        self.corpus = corpus
        self.holdout = holdout
        self.index = index
        self.no_images = torch.empty(0, 3, context.image_size, context.image_size)
        self.max_skip_fraction = cfg.max_skip_fraction
        self.virtual = [
            VirtualStream(
                corpus.name, index, cfg.seed, v, num_streams, cfg.shuffle_spans, cfg.shuffle_window, opener
            )
            for v in streams
        ]
        self.turn = 0
        # Skipped samples since the last `take_skips()`, for tracing them back.
        self.skip_log: list[tuple[SampleRef, str]] = []
        self._misses = 0  # samples tried since the last usable one
        self._failed_shards: dict[str, str] = {}  # recent shard-level failures, for the error message

    # -- reading --------------------------------------------------------------------------------

    def next_document(self) -> tuple[EncodedDocument, int]:
        """The next usable document and how many of its tokens are already packed (non-zero only for
        a document left part-packed when the state was saved); unusable samples are counted."""
        while True:
            stream = self.virtual[self.turn]
            offset, stream.offset = stream.offset, 0
            ref, position, raw, extra = stream.next_raw()
            counted = Counter({Reason.SHARD_LONGER_THAN_INDEX: extra} if extra else {})
            if extra:
                stream.skipped.update(counted)
                self.skip_log += [(ref, Reason.SHARD_LONGER_THAN_INDEX)] * extra
                sources.warn(
                    f"corpus {self.corpus.name}: {ref.shard} holds {extra} samples beyond its index count"
                )
            if self.holdout is not None and not isinstance(raw, SkipSample):
                reason = self.holdout.skip_reason(ref.shard, raw.key, ref.epoch)
                if reason is not None:  # passed over on purpose: neither tried nor a miss
                    stream.skipped[reason] += 1
                    continue
            stream.tried += 1
            try:
                document = self._encode(ref, stream.number, position, raw)
            except SkipSample as skip:
                stream.skipped[skip.reason] += 1
                self.skip_log.append((ref, skip.reason))
                if skip.reason in SHARD_REASONS:
                    self._failed_shards.pop(ref.shard, None)
                    self._failed_shards[ref.shard] = str(skip)
                    while len(self._failed_shards) > 5:
                        self._failed_shards.pop(next(iter(self._failed_shards)))
                self._misses += 1
                self._check_health()
                continue
            self._misses = 0
            document.counted = counted
            stream.dropped_images.update(document.dropped_images)
            self.turn = (self.turn + 1) % len(self.virtual)
            return document, offset

    @property
    def skipped(self) -> Counts:
        """Samples skipped so far by reason, over this stream's virtual streams."""
        total: Counts = Counter()
        for stream in self.virtual:
            total.update(stream.skipped)
        return total

    def _check_health(self) -> None:
        """Stop when the corpus can no longer feed this stream: nothing usable in two corpora's worth
        of samples in a row, or more than `max_skip_fraction` of the samples tried skipped."""
        tried = sum(s.tried for s in self.virtual)
        skipped = sum(n for reason, n in self.skipped.items() if reason not in DELIBERATE_REASONS)
        shards = len(self.index.shards)
        judged = tried >= max(
            MIN_TRIED_FOR_FRACTION, MIN_SHARDS_FOR_FRACTION * self.index.num_samples / shards
        )
        if self._misses >= 2 * self.index.num_samples:
            why = f"no usable sample in the last {self._misses} it tried"
        elif judged and skipped > self.max_skip_fraction * tried:
            why = (
                f"{skipped} of the {tried} samples it tried were skipped, over data.max_skip_fraction "
                f"{self.max_skip_fraction}"
            )
        else:
            return
        reasons = self.skipped
        shards_failed = "; ".join(f"{name} ({error})" for name, error in self._failed_shards.items())
        raise DataError(
            f"corpus {self.corpus.name} ({sources.redact(self.corpus.path)}) can no longer feed its share of "
            f"a step: {why}; skipped by reason {dict(reasons.most_common())}"
            + (f"; failing shards: {shards_failed}" if shards_failed else "")
        )

    def take_skips(self) -> list[tuple[SampleRef, str]]:
        skips, self.skip_log = self.skip_log, []
        return skips

    def _encode(
        self, ref: SampleRef, stream: int, position: int, raw: RawSample | SkipSample
    ) -> EncodedDocument:
        context = self.context
        document, encoded = usable_document(
            raw, self.corpus, context.tokenizer, context.num_image_tokens, context.cfg.seq_len
        )
        images = [context.transform(p) for p in document.parts if isinstance(p, Image.Image)]
        ids = torch.tensor(encoded.ids, dtype=torch.long)
        return EncodedDocument(
            ref=ref,
            stream=stream,
            position=position,
            ids=ids,
            image_mask=torch.tensor(encoded.image_mask, dtype=torch.bool),
            labels=torch.tensor(encoded.labels(), dtype=torch.long),
            images=torch.stack(images) if images else self.no_images,
            image_starts=(ids == context.tokenizer.boi_id).nonzero().flatten().tolist(),
            dropped_images=document.dropped_images,
        )

    # -- state ----------------------------------------------------------------------------------

    def state(self, unread: EncodedDocument | None = None, offset: int = 0) -> CorpusState:
        """Each virtual stream's position and counters; with `unread`, as if that document (the last
        one read) had not been read yet, `offset` of its tokens already packed, so that a restored
        stream reads it again and goes on after them."""
        states = {s.number: s.state() for s in self.virtual}
        turn = self.turn
        if unread is not None:
            state = states[unread.stream]
            states[unread.stream] = replace(
                state,
                epoch=unread.ref.epoch,
                position=unread.position,
                offset=offset,
                tried=state.tried - 1,
                skipped=_less(state.skipped, unread.counted),
                dropped_images=_less(state.dropped_images, unread.dropped_images),
            )
            turn = [s.number for s in self.virtual].index(unread.stream)
        return CorpusState(turn, states)

    def restore(self, state: CorpusState) -> None:
        self.turn = state.turn
        for stream in self.virtual:
            stream.restore(state.streams[stream.number])

    def close(self) -> None:
        for stream in self.virtual:
            stream.close()


def _less(counts: Mapping[str, int], taken: Mapping[str, int]) -> dict[str, int]:
    left = Counter(counts)
    left.subtract(taken)
    return saved(left)
