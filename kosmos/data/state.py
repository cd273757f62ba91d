"""The loader's resume state, typed: a virtual stream's, a corpus's within one worker, a worker's, and
one rank's loader's.

The loader works with these objects; `from_saved` and `saved` convert them from and to the plain,
JSON-serialisable dict a checkpoint holds, and are the only code that knows its layout. That layout
is the one checkpoints have always had: old states resume, and the readers of it read new ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kosmos.config import ConfigError

STATE_VERSION = 2


@dataclass(frozen=True)
class VirtualState:
    """Where one virtual stream of a corpus is: its epoch and position in its slice, the tokens
    already packed of the document at that position, the samples it tried, and its counts by reason
    of samples skipped and of images dropped. The defaults are a stream that has read nothing."""

    epoch: int = 0
    position: int = 0
    offset: int = 0
    tried: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)
    dropped_images: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_saved(cls, saved: Mapping) -> VirtualState:
        return cls(
            epoch=int(saved["epoch"]),
            position=int(saved["position"]),
            offset=int(saved["offset"]),
            tried=int(saved["tried"]),
            skipped=dict(saved["skipped"]),
            dropped_images=dict(saved["dropped_images"]),
        )

    def saved(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "offset": self.offset,
            "tried": self.tried,
            "skipped": dict(self.skipped),
            "dropped_images": dict(self.dropped_images),
        }


@dataclass(frozen=True)
class CorpusState:
    """One worker's share of a corpus: its virtual streams' states by stream number, and the index
    (in that order) of the one whose turn is next."""

    turn: int
    streams: Mapping[int, VirtualState]

    @classmethod
    def from_saved(cls, saved: Mapping) -> CorpusState:
        streams = {int(v): VirtualState.from_saved(state) for v, state in saved["streams"].items()}
        return cls(turn=int(saved["turn"]), streams=streams)

    def saved(self) -> dict:
        return {"turn": self.turn, "streams": {str(v): state.saved() for v, state in self.streams.items()}}


@dataclass(frozen=True)
class WorkerState:
    """One loader worker's state: each corpus's, by corpus name."""

    corpora: Mapping[str, CorpusState]

    @classmethod
    def from_saved(cls, saved: Mapping) -> WorkerState:
        return cls({name: CorpusState.from_saved(state) for name, state in saved.items()})

    def saved(self) -> dict:
        return {name: state.saved() for name, state in self.corpora.items()}


@dataclass(frozen=True)
class LoaderState:
    """One rank's loader after the last step the trainer received: its layout, what it reads (seed,
    each corpus's shards and samples, the held-out share if any, the epoch order's settings), the
    step, and each worker's state (None for a worker that has built no step yet).

    `holdout` is None when nothing is held out; `shuffle_spans` and `shuffle_window` are None in a
    state saved before they were recorded."""

    rank: int
    world_size: int
    num_workers: int
    virtual_streams: int
    seed: int
    corpora: Mapping[str, Mapping[str, int]]
    step: int
    workers: tuple[WorkerState | None, ...]
    holdout: float | None = None
    shuffle_spans: int | None = None
    shuffle_window: int | None = None

    @classmethod
    def from_saved(cls, saved: Mapping) -> LoaderState:
        """ConfigError for a state of another version."""
        if saved.get("version") != STATE_VERSION:
            raise ConfigError(f"data: loader state version {saved.get('version')} is not {STATE_VERSION}")
        return cls(
            rank=saved["rank"],
            world_size=saved["world_size"],
            num_workers=saved["num_workers"],
            virtual_streams=saved["virtual_streams"],
            seed=saved["seed"],
            corpora=saved["corpora"],
            step=int(saved["step"]),
            workers=tuple(None if w is None else WorkerState.from_saved(w) for w in saved["workers"]),
            holdout=saved.get("holdout"),
            shuffle_spans=saved.get("shuffle_spans"),
            shuffle_window=saved.get("shuffle_window"),
        )

    def saved(self) -> dict:
        order = {"shuffle_spans": self.shuffle_spans, "shuffle_window": self.shuffle_window}
        return {
            **{key: value for key, value in order.items() if value is not None},
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "virtual_streams": self.virtual_streams,
            "seed": self.seed,
            "corpora": {name: dict(counts) for name, counts in self.corpora.items()},
            **({"holdout": self.holdout} if self.holdout is not None else {}),
            "step": self.step,
            "workers": [None if w is None else w.saved() for w in self.workers],
        }
