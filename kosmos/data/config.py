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

from kosmos.config import ConfigError
from kosmos.data import sources
from kosmos.data.shards import INDEX_FILE, index_location, read_index


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class CorpusConfig:
    kind: Literal["text", "caption", "interleaved", "instruction"]
    path: str
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
    cache_dir: str | None = None
    # Transient read errors are retried this many times (with backoff); a shard a reader has waited
    # on (its download included) for `read_timeout_s` seconds counts as unreadable.
    read_retries: int = 4
    read_timeout_s: float = 300.0
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
        for key in ("num_workers", "virtual_streams", "read_retries", "cache_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{_key(prefix, key)}: must not be negative")
        for key in ("shuffle_spans", "shuffle_window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{_key(prefix, key)}: must be at least 1")
        if self.read_timeout_s <= 0:
            raise ConfigError(f"{_key(prefix, 'read_timeout_s')}: must be positive")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ConfigError(f"{_key(prefix, 'max_skip_fraction')}: must lie in [0, 1]")

    def check_paths(self, prefix: str) -> None:
        """Every corpus's index can be read and holds the kind the config says; its shards lie where
        this installation can read them (`pipe:` names only with `allow_pipe`)."""
        listed = [(f"{_key(prefix, 'corpora')}[{i}]", c) for i, c in enumerate(self.corpora)]
        listed += [
            (f"{_key(prefix, 'validation.corpora')}[{i}]", c) for i, c in enumerate(self.validation.corpora)
        ]
        for key, corpus in listed:
            shown = sources.redact(corpus.path)
            _check_protocol(corpus.path, f"{key}.path")
            if not sources.exists(index_location(corpus.path)):
                raise ConfigError(f"{key}.path: {shown} does not exist or has no index ({INDEX_FILE})")
            index = read_index(corpus.path)
            if index.kind != corpus.kind:
                raise ConfigError(f"{key}.kind: {corpus.kind}, but {shown} holds a {index.kind} corpus")
            if index.num_samples == 0:
                raise ConfigError(f"{key}.path: {shown} holds no samples")
            locations = [index.base] + [s.name for s in index.shards if sources.is_url(s.name)]
            pipes = [s.name for s in index.shards if sources.is_pipe(s.name)]
            for location in {sources.protocol(loc): loc for loc in locations}.values():
                _check_protocol(location, f"{key}.path")
            if pipes and not self.allow_pipe:
                raise ConfigError(
                    f"{_key(prefix, 'allow_pipe')}: {shown} names {len(pipes)} shards as pipe: commands "
                    f"(e.g. {sources.redact(pipes[0])}), which run shell commands; set it to true to allow"
                )


def _check_protocol(location: str, key: str) -> None:
    if sources.is_local(location) or sources.is_pipe(location):
        return
    import fsspec

    name = sources.protocol(location)
    try:
        fsspec.get_filesystem_class(name)
    except (ImportError, ValueError) as error:
        raise ConfigError(
            f"{key}: {sources.redact(location)}: cannot read {name}:// here ({error})"
        ) from None
