"""The training data loader: for each optimizer step, the micro-batches one rank feeds.

Each rank runs W = max(1, num_workers) loader workers: P = world_size x W physical streams, worker w
of rank r being physical stream p = r * W + w. Each corpus's epoch is split into V virtual streams
(`data.virtual_streams`, default P; see `stream.py`), and physical stream p serves the block
[p*V//P, (p+1)*V//P) of them. A worker builds whole steps from its streams: per corpus,
`rows_per_step[name]` packed rows, then micro-batches of `micro_batch_size` rows in corpus order.
Worker w builds steps w, w + W, w + 2W, ...; the torch DataLoader hands workers' items out round
robin, so steps arrive in order, and every rank gets the same number of micro-batches per step.

The state is per worker, and is taken from the last step the trainer *received* (workers read
ahead): for each corpus, each of its virtual streams' epoch, position and skip counters, the tokens
already packed of the document it left over, and whose turn is next. A restored loader starts each
worker there; the DataLoader's first worker takes the worker whose turn is next. Given every rank's
state, a loader of another layout (ranks x workers, up to V) regroups the virtual streams' positions:
every sample of the epoch is still read once, though batches differ from the uninterrupted run's.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import shutil
import signal
import sys
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kosmos.config import ConfigError
from kosmos.data import sources
from kosmos.data.batch import Batch
from kosmos.data.config import (
    CorpusConfig,
    DataConfig,
    check_streams,
    read_options,
    rows_per_step,
    stream_layout,
)
from kosmos.data.decode import SPLITTABLE_KINDS, image_transform
from kosmos.data.holdout import Holdout
from kosmos.data.packing import RowPacker, collate
from kosmos.data.shards import CorpusIndex
from kosmos.data.skips import Counts
from kosmos.data.state import CorpusState, LoaderState, VirtualState, WorkerState
from kosmos.data.stream import (
    CorpusStream,
    LazyCache,
    ReadContext,
    SampleRef,
    ShardOpener,
    stream_block,
)
from kosmos.tokenizer import Tokenizer

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent ends




@contextlib.contextmanager
def corpus_reader(
    cfg: DataConfig,
    corpus: CorpusConfig,
    index: CorpusIndex,
    tokenizer: Tokenizer,
    image_size: int,
    num_image_tokens: int,
    holdout: Holdout | None = None,
) -> Iterator[CorpusStream]:
    """The whole of one corpus as a single stream in its epoch order, read as training reads it
    (sources, cache, decoding, skip counting): for a look at a corpus outside training, or its
    held-out samples (`holdout`)."""
    cache = LazyCache(None, read_options(cfg))
    context = ReadContext(cfg, tokenizer, image_transform(image_size), image_size, num_image_tokens)
    stream = CorpusStream(context, corpus, index, range(1), 1, ShardOpener(index, cache), holdout)
    try:
        yield stream
    finally:
        stream.close()
        cache.close()


class StepBuilder:
    """One worker's streams, one per corpus, and whole steps built from them."""

    def __init__(
        self,
        context: ReadContext,
        indexes: dict[str, CorpusIndex],
        rows: dict[str, int],
        physical: int,
        num_physical: int,
        num_virtual: int,
        cache_root: str | None,
    ):
        cfg = context.cfg
        self.cfg = cfg
        self.rows = rows
        self.image_size = context.image_size
        self.cache = LazyCache(cache_root, read_options(cfg))
        holdout = Holdout(cfg.validation.holdout, validation=False) if cfg.validation.holdout else None
        streams = stream_block(physical, num_physical, num_virtual)
        self.packers = {
            corpus.name: RowPacker(
                CorpusStream(
                    context,
                    corpus,
                    indexes[corpus.name],
                    streams,
                    num_virtual,
                    ShardOpener(indexes[corpus.name], self.cache),
                    holdout,
                ),
                cfg.seq_len,
                splittable=corpus.kind in SPLITTABLE_KINDS,
            )
            for corpus in cfg.corpora
        }

    def next_step(self) -> tuple[list[Batch], list[SampleRef], list[tuple[SampleRef, str]]]:
        """The step's micro-batches, the documents that began in it, and the samples it skipped."""
        rows, corpora, started, skipped = [], [], [], []
        for name, packer in self.packers.items():
            packed, first_read = packer.pack(self.rows[name])
            rows += packed
            corpora += [name] * len(packed)
            started += first_read
            skipped += packer.stream.take_skips()
        size = self.cfg.micro_batch_size
        batches = [
            collate(rows[i : i + size], corpora[i : i + size], self.cfg.seq_len, self.image_size)
            for i in range(0, len(rows), size)
        ]
        return batches, started, skipped

    def state(self) -> WorkerState:
        return WorkerState({name: packer.state() for name, packer in self.packers.items()})

    def restore(self, state: WorkerState) -> None:
        for name, packer in self.packers.items():
            packer.restore(state.corpora[name])

    def close(self) -> None:
        for packer in self.packers.values():
            packer.stream.close()
        self.cache.close()


class _Steps(IterableDataset):
    """The steps of one rank, each built by the worker whose turn it is."""

    def __init__(self, loader: StepLoader):
        self.loader = loader
        self.first_step = loader.step
        self.states = list(loader.worker_states)

    def __iter__(self):
        loader = self.loader
        info = get_worker_info()
        step = self.first_step + (info.id if info is not None else 0)
        worker = step % loader.num_workers
        builder = StepBuilder(
            loader.context,
            loader.indexes,
            loader.rows_per_step,
            physical=loader.rank * loader.num_workers + worker,
            num_physical=loader.world_size * loader.num_workers,
            num_virtual=loader.virtual_streams,
            cache_root=loader.cache_root(),
        )
        if self.states[worker] is not None:
            builder.restore(self.states[worker])
        try:
            while True:
                yield step, worker, *builder.next_step(), builder.state()
                step += loader.num_workers
        finally:
            builder.close()


def _start_worker(worker_id: int) -> None:
    """Loader workers leave stop signals to the training process, which checkpoints and then shuts
    them down (under SLURM a signal reaches every process of the job, and Ctrl-C every process of the
    terminal's process group, workers included). Linux also ends a worker when its process ends, however
    it ends: a worker never outlives the process it loads for."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _end_workers(iterators: weakref.WeakSet) -> None:
    """Stop the worker processes of DataLoader iterators; those still busy after seconds are killed."""
    for items in list(iterators):
        # torch's own shutdown asks the workers to stop and stops watching them for failures; a
        # worker still busy after it (a stuck read) is then killed, without alarming torch.
        items._shutdown_workers()
        for worker in items._workers:
            if worker.is_alive():
                worker.kill()
                worker.join()


# Every loader's running workers, weakly. At exit they are stopped by this hook: registered after
# torch's, it runs before it (last in, first out), while torch can still shut workers down, and
# before multiprocessing's, which would send them SIGTERM and wait for them forever.
_RUNNING: weakref.WeakSet = weakref.WeakSet()
atexit.register(_end_workers, _RUNNING)


class StepLoader:
    """Iterate for each step's micro-batches (a list of `micro_batches_per_step` `Batch`es).

    Infinite: epochs follow one another (`epochs` tells how far each corpus is). `state_dict()` is the
    position after the last step received; `load_state_dict()` before iterating resumes there.
    """

    def __init__(
        self,
        cfg: DataConfig,
        indexes: dict[str, CorpusIndex],
        tokenizer: Tokenizer,
        image_size: int,
        num_image_tokens: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg = cfg
        self.indexes = indexes
        # The transform is built here so that loader workers inherit it (and open_clip) instead of
        # importing again.
        self.context = ReadContext(cfg, tokenizer, image_transform(image_size), image_size, num_image_tokens)
        self.rank = rank
        self.world_size = world_size
        self.num_workers, self.virtual_streams = stream_layout(cfg, world_size)
        self.rows_per_step = rows_per_step(cfg, indexes, world_size, num_image_tokens, self.virtual_streams)
        self.micro_batches_per_step = sum(self.rows_per_step.values()) // cfg.micro_batch_size
        self.step = 0
        self.worker_states: list[WorkerState | None] = [None] * self.num_workers
        # The last step received: the documents that began in it, and the samples skipped while
        # building it with their reasons (to trace a batch, or a bad sample, back to its shard).
        self.last_step_samples: list[SampleRef] = []
        self.last_step_skipped: list[tuple[SampleRef, str]] = []
        # Weakly: a strong reference would tie the workers' lifetime to this loader's (a reference
        # cycle through the dataset) instead of to the iteration that started them.
        self._worker_iterators: weakref.WeakSet = weakref.WeakSet()
        self._cache_root: str | None = None

    @property
    def physical_streams(self) -> int:
        return self.world_size * self.num_workers

    def cache_root(self) -> str | None:
        """A folder for the workers' caches of remote shards (removed with the loader); None if every
        corpus is local."""
        remote = any(
            not sources.is_local(index.base) or any(not sources.is_local(s.name) for s in index.shards)
            for index in self.indexes.values()
        )
        if remote and self._cache_root is None:
            self._cache_root = tempfile.mkdtemp(prefix="kosmos-shards-", dir=self.cfg.cache_dir)
            weakref.finalize(self, shutil.rmtree, self._cache_root, True)
        return self._cache_root

    def __iter__(self) -> Iterator[list[Batch]]:
        self.cache_root()
        steps = _Steps(self)
        if self.cfg.num_workers == 0:
            items = iter(steps)
        else:
            items = iter(
                DataLoader(
                    steps,
                    batch_size=None,
                    num_workers=self.cfg.num_workers,
                    pin_memory=torch.cuda.is_available(),
                    worker_init_fn=_start_worker,
                )
            )
            self._worker_iterators.add(items)
            _RUNNING.add(items)
        for step, worker, batches, started, skipped, state in items:
            assert step == self.step, f"loader step {step} arrived when {self.step} was expected"
            self.worker_states[worker] = state
            self.step += 1
            self.last_step_samples, self.last_step_skipped = started, skipped
            yield batches

    def close(self) -> None:
        """Stop this loader's worker processes now (a training that ends with an error calls it)."""
        _end_workers(self._worker_iterators)

    # -- counters -------------------------------------------------------------------------------

    def _virtual_states(self, corpus: str) -> list[VirtualState]:
        return [
            stream
            for state in self.worker_states
            if state is not None
            for stream in state.corpora[corpus].streams.values()
        ]

    def _counters(self, field: str) -> dict[str, int]:
        total: Counts = Counter()
        for corpus in self.cfg.corpora:
            for stream in self._virtual_states(corpus.name):
                total.update(getattr(stream, field))
        return dict(total)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason (all corpora)."""
        return self._counters("skipped")

    @property
    def dropped_images(self) -> dict[str, int]:
        """Images left out of kept interleaved documents so far on this rank, by reason."""
        return self._counters("dropped_images")

    @property
    def epochs(self) -> dict[str, int]:
        """Per corpus, the epochs every virtual stream of this rank has finished."""
        started = all(state is not None for state in self.worker_states)
        return {
            corpus.name: min(s.epoch for s in self._virtual_states(corpus.name)) if started else 0
            for corpus in self.cfg.corpora
        }

    # -- state ----------------------------------------------------------------------------------

    def _content(self) -> dict:
        """What a state must share with this loader to be resumed at all."""
        content = {
            "seed": self.cfg.seed,
            "corpora": {
                name: {"shards": len(index.shards), "samples": index.num_samples}
                for name, index in self.indexes.items()
            },
        }
        if self.cfg.validation.holdout:  # which samples are trained on
            content["holdout"] = self.cfg.validation.holdout
        return content

    def _order(self) -> dict:
        """The settings the epoch order depends on besides the seed: a resume must keep them."""
        return {"shuffle_spans": self.cfg.shuffle_spans, "shuffle_window": self.cfg.shuffle_window}

    def state(self) -> LoaderState:
        return LoaderState(
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            virtual_streams=self.virtual_streams,
            step=self.step,
            workers=tuple(self.worker_states),
            **self._content(),
            **self._order(),
        )

    def state_dict(self) -> dict:
        return self.state().saved()

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from this rank's saved state, or from every rank's (a list, in rank order): on the same
        layout exactly where this rank stopped; on another one (ranks x workers), by regrouping the
        saved virtual streams over this layout."""
        states = [LoaderState.from_saved(saved) for saved in (state if isinstance(state, list) else [state])]
        for saved in states:
            content = {key: getattr(saved, key) for key in self._content()}
            if content != self._content():
                raise ConfigError(
                    f"data: the loader state does not fit this run (saved {content}, now {self._content()}); "
                    "resuming needs the same corpora and seed"
                )
            for key, now in self._order().items():  # (None in states saved before they were recorded)
                if getattr(saved, key) not in (None, now):
                    raise ConfigError(
                        f"data.{key}: the loader state was saved with {getattr(saved, key)}, not {now}; the "
                        "epoch order depends on it, so a resume with another value would read some samples "
                        "twice and others never (resume with the saved value)"
                    )
        virtual = states[0].virtual_streams
        if self.cfg.virtual_streams not in (0, virtual):
            raise ConfigError(
                f"data.virtual_streams: the loader state has {virtual} virtual streams, not "
                f"{self.cfg.virtual_streams} (they are fixed for a run; leave it 0 to follow the state)"
            )
        if len({s.step for s in states}) > 1 or len({s.virtual_streams for s in states}) > 1:
            raise ConfigError("data: the loader states of the ranks disagree on step or virtual streams")
        check_streams(virtual, self.world_size, self.num_workers)
        self.rows_per_step = rows_per_step(
            self.cfg, self.indexes, self.world_size, self.context.num_image_tokens, virtual
        )
        self.virtual_streams = virtual
        layout = (self.rank, self.world_size, self.num_workers)
        mine = [s for s in states if (s.rank, s.world_size, s.num_workers) == layout]
        if mine:
            self.worker_states = list(mine[0].workers)
        else:
            self.worker_states = self._regrouped(states)
        self.step = states[0].step
        self.last_step_samples, self.last_step_skipped = [], []

    def _regrouped(self, states: list[LoaderState]) -> list[WorkerState | None]:
        """This rank's worker states from every saved rank's, the virtual streams regrouped."""
        saved_world = states[0].world_size
        if sorted(s.rank for s in states) != list(range(saved_world)):
            raise ConfigError(
                f"data: the loader state was saved by {saved_world} ranks x {states[0].num_workers} "
                f"workers; resuming as {self.world_size} x {self.num_workers} needs the states of all "
                f"{saved_world} ranks"
            )
        streams: dict[str, dict[int, VirtualState]] = {c.name: {} for c in self.cfg.corpora}
        for saved in states:
            for w, worker in enumerate(saved.workers):
                block = stream_block(
                    saved.rank * saved.num_workers + w, saved_world * saved.num_workers, self.virtual_streams
                )
                for name, held in streams.items():
                    for v in block:
                        held[v] = worker.corpora[name].streams[v] if worker is not None else VirtualState()
        return [
            WorkerState(
                {
                    name: CorpusState(
                        turn=0,
                        streams={
                            v: held[v]
                            for v in stream_block(
                                self.rank * self.num_workers + w, self.physical_streams, self.virtual_streams
                            )
                        },
                    )
                    for name, held in streams.items()
                }
            )
            for w in range(self.num_workers)
        ]


def build_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    image_size: int,
    num_image_tokens: int,
    rank: int = 0,
    world_size: int = 1,
) -> StepLoader:
    """The loader of one rank. Checks corpora and step layout (ConfigError); starts no worker yet."""
    indexes = cfg.check_paths("data")  # each index read once: a second read could meet another version
    return StepLoader(cfg, indexes, tokenizer, image_size, num_image_tokens, rank, world_size)
