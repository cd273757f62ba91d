"""The `data:` section of a training config: the corpora, their per-step token budgets, the packing.

```
data:
  seq_len: 2048
  micro_batch_size: 2
  seed: 0
  num_workers: 2
  corpora:
    - {kind: text, path: corpora/text, tokens_per_step: 524288}
    - {kind: caption, path: corpora/laion, tokens_per_step: 524288}
    - {kind: interleaved, path: corpora/obelics, tokens_per_step: 262144, max_images: 5}
```

`tokens_per_step` is the corpus's share of one optimizer step over all ranks, in sequence positions
(image slots included): each rank packs `tokens_per_step / (seq_len * world_size)` rows of it per step.
A corpus path is a local folder (relative to the working directory) or an fsspec URL (`s3://...`,
`gs://...`, `https://...`) of the folder holding its index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kosmos.config import PATH, ConfigError, problems_of, raise_problems
from kosmos.data import sources
from kosmos.data.shards import INDEX_FILE, CorpusIndex, read_index  # noqa: F401 - INDEX_FILE is read from here too


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class CorpusConfig:
    kind: Literal["text", "caption", "interleaved", "instruction"]
    path: str = field(metadata=PATH)
    tokens_per_step: int
    # Names the corpus in batches (`source`), metrics and loader state; defaults to the kind.
    name: str = ""
    # Interleaved documents keep their first `max_images` usable images; later ones are dropped.
    max_images: int = 5
    # Images whose shorter side is below this are dropped (caption pairs holding one are skipped).
    min_image_size: int = 64

    def __post_init__(self) -> None:
        self.name = self.name or self.kind

    def validate(self, prefix: str) -> None:
        if self.tokens_per_step < 1:
            raise ConfigError(f"{_key(prefix, 'tokens_per_step')}: must be at least 1")
        if self.max_images < 1:
            raise ConfigError(f"{_key(prefix, 'max_images')}: must be at least 1")
        if self.min_image_size < 1:
            raise ConfigError(f"{_key(prefix, 'min_image_size')}: must be at least 1")


@dataclass
class ValidationConfig:
    """The held-out set the validation loss is measured on (`train.eval_interval` says how often).

    Either `holdout`, a share of every training corpus (chosen by a hash of each sample's shard and
    key, `kosmos.data.holdout`, and never trained on), or validation corpora of their own (any source a
    training corpus may have).
    """

    holdout: float = 0.0
    # Their `tokens_per_step` plays no part.
    corpora: list[CorpusConfig] = field(default_factory=list)
    # Packed rows of `seq_len` per corpus (fewer if its held-out samples run out first), read in the
    # corpus's epoch-0 order with one stream: the same set whatever the world size. With `holdout`,
    # reading them scans about rows / holdout rows' worth of each corpus, once per launch.
    rows: int = 32

    @property
    def enabled(self) -> bool:
        return self.holdout > 0 or bool(self.corpora)

    def validate(self, prefix: str) -> None:
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"{_key(prefix, 'holdout')}: must lie in [0, 1)")
        if self.holdout and self.corpora:
            raise ConfigError(
                f"{_key(prefix, 'corpora')}: give either a holdout share or validation corpora, not both"
            )
        names = [c.name for c in self.corpora]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(
                    f"{_key(prefix, 'corpora')}[{i}].name: {name!r} is used twice (names must differ)"
                )
        if self.rows < 1:
            raise ConfigError(f"{_key(prefix, 'rows')}: must be at least 1")


@dataclass
class DataConfig:
    corpora: list[CorpusConfig]
    seq_len: int = 2048
    # Rows per forward/backward pass; a step's rows over all corpora must divide into micro-batches.
    micro_batch_size: int = 8
    seed: int = 0
    # Loader processes per rank; 0 reads in the training process.
    num_workers: int = 2
    # Parts each corpus's epoch is split into, each with its own exact position; every loader worker
    # of every rank serves a block of them. 0 = ranks x workers (at least 1) of the run's first launch.
    # A resume may use any number of ranks x workers up to this.
    virtual_streams: int = 0
    # Each virtual stream reads this many shard spans at once, interleaved, and shuffles what it reads
    # in windows of `shuffle_window` samples (one window is held in memory, and re-read on resume).
    shuffle_spans: int = 8
    shuffle_window: int = 512
    # Remote shards are fetched whole, ahead of need, into a local disk cache of at most `cache_mb`
    # per loader process, under `cache_dir` (default: the system's temporary folder).
    cache_mb: int = 8192
    cache_dir: str | None = field(default=None, metadata=PATH)
    # Remote reads: a connection, or a read on it, that gets nothing for `read_timeout_s` fails; failures
    # that may pass (timeouts, dropped connections, 408, 429, 5xx) are retried with backoff for up to
    # `read_retry_s` in all, so an outage shorter than that is waited out; then the shard is unreadable.
    read_timeout_s: float = 60.0
    read_retry_s: float = 600.0
    # webdataset `pipe:` shard names run shell commands: refused unless this is set.
    allow_pipe: bool = False
    # A corpus stops training (DataError) when a stream has skipped more than this fraction of the
    # samples it tried (checked once it has tried at least 8 shards' worth, and 1,000).
    max_skip_fraction: float = 0.5
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self, prefix: str) -> None:
        if not self.corpora:
            raise ConfigError(f"{_key(prefix, 'corpora')}: at least one corpus is needed")
        names = [c.name for c in self.corpora]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(
                    f"{_key(prefix, 'corpora')}[{i}].name: {name!r} is used twice (names must differ)"
                )
        for key in ("seq_len", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{_key(prefix, key)}: must be at least 1")
        for key in ("num_workers", "virtual_streams", "cache_mb", "read_retry_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{_key(prefix, key)}: must not be negative")
        for key in ("shuffle_spans", "shuffle_window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{_key(prefix, key)}: must be at least 1")
        if self.read_timeout_s <= 0:
            raise ConfigError(f"{_key(prefix, 'read_timeout_s')}: must be positive")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ConfigError(f"{_key(prefix, 'max_skip_fraction')}: must lie in [0, 1]")

    def check_paths(self, prefix: str) -> dict[str, CorpusIndex]:
        """Every corpus's index can be read and holds the kind the config says; its shards lie where
        this installation can read them (`pipe:` names only with `allow_pipe`); the validation
        corpora's too. Returns the training corpora's indexes by name; the problems of every corpus are
        raised together."""
        indexes, problems = {}, []
        for key, corpus in self.listed_corpora(prefix):
            try:
                index = self.check_corpus(corpus, key, prefix)
            except ConfigError as error:
                problems += problems_of(error)
                continue
            if corpus in self.corpora:
                indexes[corpus.name] = index
        raise_problems(problems)
        return indexes

    def listed_corpora(self, prefix: str) -> list[tuple[str, CorpusConfig]]:
        """(dotted key, corpus) of the training corpora, then the validation corpora."""
        listed = [(f"{_key(prefix, 'corpora')}[{i}]", c) for i, c in enumerate(self.corpora)]
        return listed + [
            (f"{_key(prefix, 'validation.corpora')}[{i}]", c) for i, c in enumerate(self.validation.corpora)
        ]

    def check_corpus(self, corpus: CorpusConfig, key: str, prefix: str) -> CorpusIndex:
        """`check_paths` of one corpus (named `key` in messages): its index."""
        shown = sources.redact(corpus.path)
        check_protocol(corpus.path, f"{key}.path")
        try:
            index = read_index(corpus.path, read_options(self))
        except ConfigError as error:
            raise ConfigError(f"{key}.path: {error}") from None
        if index.kind != corpus.kind:
            raise ConfigError(f"{key}.kind: {corpus.kind}, but {shown} holds a {index.kind} corpus")
        if index.num_samples == 0:
            raise ConfigError(f"{key}.path: {shown} holds no samples")
        locations = [index.base] + [s.name for s in index.shards if sources.is_url(s.name)]
        pipes = [s.name for s in index.shards if sources.is_pipe(s.name)]
        for location in {sources.protocol(loc): loc for loc in locations}.values():
            check_protocol(location, f"{key}.path")
        if pipes and not self.allow_pipe:
            raise ConfigError(
                f"{_key(prefix, 'allow_pipe')}: {shown} names {len(pipes)} shards as pipe: commands "
                f"(e.g. {sources.redact(pipes[0])}), which run shell commands; set it to true to allow"
            )
        return index


def rows_per_step(
    cfg: DataConfig,
    indexes: dict[str, CorpusIndex],
    world_size: int,
    num_image_tokens: int,
    virtual_streams: int,
) -> dict[str, int]:
    """Rows each rank packs per step for each corpus; checks that the step layout works out (every
    problem together). A corpus missing from `indexes` (its index unreadable) has its sample count
    left unchecked."""
    if cfg.seq_len < num_image_tokens + 4:
        raise ConfigError(
            f"data.seq_len: {cfg.seq_len} cannot hold an image ({num_image_tokens} slots + markers)"
        )
    row_tokens = cfg.seq_len * world_size
    rows, problems = {}, []
    for i, corpus in enumerate(cfg.corpora):
        key = f"data.corpora[{i}]"
        if corpus.tokens_per_step % row_tokens:
            lower = corpus.tokens_per_step // row_tokens * row_tokens
            problems.append(
                f"{key}.tokens_per_step: {corpus.tokens_per_step} is not a multiple of seq_len x world size "
                f"= {cfg.seq_len} x {world_size}; use e.g. "
                + (f"{lower} or {lower + row_tokens}" if lower else f"{row_tokens}")
            )
        index = indexes.get(corpus.name)
        if index is not None and index.num_samples < virtual_streams:
            problems.append(
                f"{key}.path: {sources.redact(corpus.path)} has {index.num_samples} samples, "
                f"fewer than the {virtual_streams} streams reading it (world size {world_size} x "
                f"{max(1, cfg.num_workers)} workers, or data.virtual_streams)"
            )
        rows[corpus.name] = corpus.tokens_per_step // row_tokens
    total = sum(rows.values())
    if not problems and total % cfg.micro_batch_size:
        layout = ", ".join(f"{name} {n}" for name, n in rows.items())
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        problems.append(
            f"data.micro_batch_size: a step holds {total} rows per rank ({layout}), which micro-batches of "
            f"{cfg.micro_batch_size} rows do not divide; use one of {divisors}"
        )
    raise_problems(problems)
    return rows


def stream_layout(cfg: DataConfig, world_size: int) -> tuple[int, int]:
    """Loader workers per rank and virtual streams of a run on `world_size` ranks: `data.virtual_streams`,
    or one per physical stream (ranks x workers); checked as `check_streams` checks them."""
    workers = max(1, cfg.num_workers)
    virtual = cfg.virtual_streams or world_size * workers
    check_streams(virtual, world_size, workers)
    return workers, virtual


def check_streams(virtual: int, world_size: int, num_workers: int) -> None:
    """A physical stream (one rank's loader worker) serves one or more virtual streams, never part of one."""
    if world_size * num_workers > virtual:
        raise ConfigError(
            f"data.virtual_streams: {virtual} virtual streams can feed at most {virtual} physical streams "
            f"(ranks x workers), not {world_size} x {num_workers} = {world_size * num_workers}; "
            f"use fewer ranks or workers"
        )


def read_options(cfg: DataConfig) -> sources.ReadOptions:
    return sources.ReadOptions(
        allow_pipe=cfg.allow_pipe,
        retry_s=cfg.read_retry_s,
        timeout_s=cfg.read_timeout_s,
        cache_bytes=cfg.cache_mb << 20,
        cache_dir=cfg.cache_dir,
    )


def check_protocol(location: str, key: str) -> None:
    """A ConfigError naming `key` unless this installation can read `location`'s store."""
    if sources.is_local(location):
        return
    if sources.is_pipe(location):
        raise ConfigError(f"{key}: {sources.redact(location)} is a pipe: command, not a folder or URL")
    import fsspec

    name = sources.protocol(location)
    try:
        fsspec.get_filesystem_class(name)
    except (ImportError, ValueError) as error:
        raise ConfigError(
            f"{key}: {sources.redact(location)}: cannot read {name}:// here ({error})"
        ) from None
