"""The training data loader: for each optimizer step, the micro-batches one rank feeds.

Each rank runs W = max(1, num_workers) loader workers, and worker w of rank r owns stream
s = r * W + w (of S = world_size * W) of every corpus (see `stream.py`). A worker builds whole steps
from its own streams: per corpus, `rows_per_step[name]` packed rows, then micro-batches of
`micro_batch_size` rows in corpus order. Worker w builds steps w, w + W, w + 2W, ...; the torch
DataLoader hands workers' items out round robin, so steps arrive in order, and every rank gets the
same number of micro-batches per step.

The state is per worker, and is taken from the last step the trainer *received* (workers read
ahead): for each corpus the stream's epoch and position, the tokens already packed of the document
it left over, and the skip counters. A restored loader starts each worker there; the DataLoader's
first worker takes the worker whose turn is next.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kosmos.config import ConfigError
from kosmos.data.config import DataConfig
from kosmos.data.decode import SPLITTABLE_KINDS, image_transform
from kosmos.data.packing import RowPacker, collate
from kosmos.data.shards import CorpusIndex, read_index
from kosmos.data.stream import CorpusStream, SampleRef
from kosmos.tokenizer import Tokenizer

STATE_VERSION = 1
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent ends


def rows_per_step(
    cfg: DataConfig, indexes: dict[str, CorpusIndex], world_size: int, num_image_tokens: int
) -> dict[str, int]:
    """Rows each rank packs per step for each corpus; checks that the step layout works out."""
    if cfg.seq_len < num_image_tokens + 4:
        raise ConfigError(
            f"data.seq_len: {cfg.seq_len} cannot hold an image ({num_image_tokens} slots + markers)"
        )
    row_tokens = cfg.seq_len * world_size
    streams = world_size * max(1, cfg.num_workers)
    rows = {}
    for i, corpus in enumerate(cfg.corpora):
        key = f"data.corpora[{i}]"
        if corpus.tokens_per_step % row_tokens:
            lower = corpus.tokens_per_step // row_tokens * row_tokens
            raise ConfigError(
                f"{key}.tokens_per_step: {corpus.tokens_per_step} is not a multiple of seq_len x world size "
                f"= {cfg.seq_len} x {world_size}; use e.g. {lower or row_tokens} or {lower + row_tokens}"
            )
        if indexes[corpus.name].num_samples < streams:
            raise ConfigError(
                f"{key}.path: {corpus.path} has {indexes[corpus.name].num_samples} samples, fewer than the "
                f"{streams} streams reading it (world size {world_size} x {max(1, cfg.num_workers)} workers)"
            )
        rows[corpus.name] = corpus.tokens_per_step // row_tokens
    total = sum(rows.values())
    if total % cfg.micro_batch_size:
        layout = ", ".join(f"{name} {n}" for name, n in rows.items())
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        raise ConfigError(
            f"data.micro_batch_size: a step holds {total} rows per rank ({layout}), which micro-batches of "
            f"{cfg.micro_batch_size} rows do not divide; use one of {divisors}"
        )
    return rows


class StepBuilder:
    """One worker's streams, one per corpus, and whole steps built from them."""

    def __init__(
        self,
        cfg: DataConfig,
        indexes: dict[str, CorpusIndex],
        rows: dict[str, int],
        tokenizer: Tokenizer,
        transform: Callable[[Image.Image], torch.Tensor],
        image_size: int,
        num_image_tokens: int,
        stream: int,
        num_streams: int,
    ):
        self.cfg = cfg
        self.rows = rows
        self.image_size = image_size
        self.packers = {
            corpus.name: RowPacker(
                CorpusStream(
                    corpus,
                    indexes[corpus.name],
                    tokenizer,
                    transform,
                    image_size,
                    num_image_tokens,
                    cfg.seq_len,
                    cfg.seed,
                    stream,
                    num_streams,
                ),
                cfg.seq_len,
                splittable=corpus.kind in SPLITTABLE_KINDS,
            )
            for corpus in cfg.corpora
        }

    def next_step(self) -> tuple[list[dict], list[SampleRef], list[tuple[SampleRef, str]]]:
        """The step's micro-batches, the documents that began in it, and the samples it skipped."""
        rows, sources, started, skipped = [], [], [], []
        for name, packer in self.packers.items():
            packed, first_read = packer.pack(self.rows[name])
            rows += packed
            sources += [name] * len(packed)
            started += first_read
            skipped += packer.stream.take_skips()
        size = self.cfg.micro_batch_size
        batches = [
            collate(rows[i : i + size], sources[i : i + size], self.cfg.seq_len, self.image_size)
            for i in range(0, len(rows), size)
        ]
        return batches, started, skipped

    def state_dict(self) -> dict:
        return {name: packer.state_dict() for name, packer in self.packers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, packer in self.packers.items():
            packer.load_state_dict(state[name])


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
            loader.cfg,
            loader.indexes,
            loader.rows_per_step,
            loader.tokenizer,
            loader.transform,
            loader.image_size,
            loader.num_image_tokens,
            stream=loader.rank * loader.num_workers + worker,
            num_streams=loader.world_size * loader.num_workers,
        )
        if self.states[worker] is not None:
            builder.load_state_dict(self.states[worker])
        while True:
            yield step, worker, *builder.next_step(), builder.state_dict()
            step += loader.num_workers


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
    """Iterate for each step's micro-batches (a list of `micro_batches_per_step` batch dicts).

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
        self.tokenizer = tokenizer
        self.image_size = image_size
        # Built here so that loader workers inherit it (and open_clip) instead of importing again.
        self.transform = image_transform(image_size)
        self.num_image_tokens = num_image_tokens
        self.rank = rank
        self.world_size = world_size
        self.rows_per_step = rows_per_step(cfg, indexes, world_size, num_image_tokens)
        self.micro_batches_per_step = sum(self.rows_per_step.values()) // cfg.micro_batch_size
        self.num_workers = max(1, cfg.num_workers)
        self.step = 0
        self.worker_states: list[dict | None] = [None] * self.num_workers
        # The last step received: the documents that began in it, and the samples skipped while
        # building it with their reasons (to trace a batch, or a bad sample, back to its shard).
        self.last_step_samples: list[SampleRef] = []
        self.last_step_skipped: list[tuple[SampleRef, str]] = []
        # Weakly: a strong reference would tie the workers' lifetime to this loader's (a reference
        # cycle through the dataset) instead of to the iteration that started them.
        self._worker_iterators: weakref.WeakSet = weakref.WeakSet()

    def __iter__(self) -> Iterator[list[dict]]:
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

    def _counters(self, field: str) -> dict[str, int]:
        total: Counter[str] = Counter()
        for state in filter(None, self.worker_states):
            for corpus in state.values():
                total.update(corpus[field])
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
        """Per corpus, the epochs every stream of this rank has finished."""
        return {
            corpus.name: min((s[corpus.name]["epoch"] if s else 0) for s in self.worker_states)
            for corpus in self.cfg.corpora
        }

    # -- state ----------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.cfg.seed,
            "corpora": {
                name: {"shards": len(index.shards), "samples": index.num_samples}
                for name, index in self.indexes.items()
            },
        }

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._layout(), "step": self.step, "workers": self.worker_states}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        saved = {key: state[key] for key in self._layout()}
        if saved["num_workers"] != self.num_workers:
            raise ConfigError(
                f"data.num_workers: the loader state was saved with {saved['num_workers']} workers per rank "
                f"and resumes exactly only with as many (0 and 1 count as 1)"
            )
        if saved != self._layout():
            raise ConfigError(
                f"data: the loader state does not fit this run (saved {saved}, now {self._layout()}); "
                "exact resume needs the same corpora, seed, rank and world size"
            )
        self.step = int(state["step"])
        self.worker_states = list(state["workers"])
        self.last_step_samples, self.last_step_skipped = [], []


def build_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    image_size: int,
    num_image_tokens: int,
    rank: int = 0,
    world_size: int = 1,
) -> StepLoader:
    """The loader of one rank. Checks corpora and step layout (ConfigError); starts no worker yet."""
    cfg.check_paths("data")
    indexes = {corpus.name: read_index(corpus.path) for corpus in cfg.corpora}
    return StepLoader(cfg, indexes, tokenizer, image_size, num_image_tokens, rank, world_size)
