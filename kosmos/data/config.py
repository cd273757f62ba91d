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
Corpus paths are relative to the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kosmos.config import ConfigError

INDEX_FILE = "index.json"


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
class DataConfig:
    corpora: list[CorpusConfig]
    seq_len: int = 2048
    # Rows per forward/backward pass; a step's rows over all corpora must divide into micro-batches.
    micro_batch_size: int = 8
    seed: int = 0
    # Loader processes per rank; 0 reads in the training process. Part of the resume state: a run
    # resumes with the same number of workers (0 and 1 are interchangeable).
    num_workers: int = 2

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
        if self.num_workers < 0:
            raise ConfigError(f"{_key(prefix, 'num_workers')}: must not be negative")

    def check_paths(self, prefix: str) -> None:
        """Every corpus folder exists, has an index, and holds the kind the config says."""
        from kosmos.data.shards import read_index

        for i, corpus in enumerate(self.corpora):
            key = f"{_key(prefix, 'corpora')}[{i}]"
            if not (Path(corpus.path) / INDEX_FILE).is_file():
                raise ConfigError(f"{key}.path: {corpus.path} does not exist or has no index ({INDEX_FILE})")
            index = read_index(corpus.path)
            if index.kind != corpus.kind:
                raise ConfigError(f"{key}.kind: {corpus.kind}, but {corpus.path} holds a {index.kind} corpus")
            if index.num_samples == 0:
                raise ConfigError(f"{key}.path: {corpus.path} holds no samples")
