"""WebDataset corpus folders: uncompressed tar shards plus `index.json`, their shard names and counts.

A sample is the run of consecutive tar members sharing a key (the member name up to the first dot of
its base name, as webdataset groups them); the rest of the name is the member's suffix (`txt`, `jpg`,
`0.png`). The index makes an epoch, and a position inside it, countable without reading the shards.

Shards are read with random access (`ShardReader`), so a loader can visit a shard's samples in a
shuffled order and resume at any of them. Only members whose suffix ends in a text, JSON or image
extension are read; anything else (pickles included) is never touched.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import webdataset
from webdataset.tariterators import base_plus_ext

from kosmos.config import ConfigError
from kosmos.data.config import INDEX_FILE

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
READABLE_EXTENSIONS = ("txt", "json", *IMAGE_EXTENSIONS)
# Refuse members larger than this without reading them.
MAX_MEMBER_BYTES = 64 << 20
INDEX_VERSION = 1


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ShardInfo:
    name: str
    samples: int


@dataclass
class CorpusIndex:
    kind: str
    shards: list[ShardInfo]
    # Samples the builder left out, by reason (they are not in the shards).
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


def read_index(folder: str | Path) -> CorpusIndex:
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no corpus index ({INDEX_FILE})")
    try:
        raw = json.loads(path.read_text())
        return CorpusIndex(
            kind=raw["kind"],
            shards=[ShardInfo(str(s["name"]), int(s["samples"])) for s in raw["shards"]],
            skipped={str(k): int(v) for k, v in raw.get("skipped", {}).items()},
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a corpus index ({type(error).__name__}: {error})") from None


def write_index(folder: str | Path, index: CorpusIndex) -> None:
    raw = {
        "version": INDEX_VERSION,
        "kind": index.kind,
        "samples": index.num_samples,
        "shards": [{"name": s.name, "samples": s.samples} for s in index.shards],
        "skipped": dict(sorted(index.skipped.items())),
    }
    (Path(folder) / INDEX_FILE).write_text(json.dumps(raw, indent=1) + "\n")


class CorpusWriter:
    """Writes samples into numbered shards and, on close, the index (build-time skips included)."""

    def __init__(
        self, folder: str | Path, kind: str, samples_per_shard: int = 10_000, max_shard_bytes: int = 1 << 30
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if any(self.folder.iterdir()):
            raise ConfigError(f"{self.folder}: the output folder is not empty")
        self.kind = kind
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[ShardInfo] = []
        self.skipped: Counter[str] = Counter()
        self._tar: webdataset.TarWriter | None = None
        self.index: CorpusIndex | None = None
        self._bytes = 0
        self._count = 0

    def write(self, members: dict[str, bytes]) -> None:
        """Add one sample: member suffix -> bytes (its key is assigned here)."""
        shard = self.shards[-1] if self.shards else None
        if shard is None or shard.samples >= self.samples_per_shard or self._bytes >= self.max_shard_bytes:
            self._next_shard()
        key = f"{self._count:09d}"
        # A fixed mtime makes shards byte-for-byte reproducible.
        self._bytes += self._tar.write({"__key__": key, **members})
        self.shards[-1].samples += 1
        self._count += 1

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def _next_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        name = f"shard-{len(self.shards):06d}.tar"
        self._tar = webdataset.TarWriter(str(self.folder / name), encoder=False, mtime=0)
        self.shards.append(ShardInfo(name, 0))
        self._bytes = 0

    def close(self) -> None:
        """Finish the last shard and write the index (then `self.index` is set)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self.index = CorpusIndex(self.kind, self.shards, dict(self.skipped))
        write_index(self.folder, self.index)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()  # no index: a half-built folder is not a corpus


@dataclass
class RawSample:
    key: str
    # suffix -> bytes, for the readable members only
    members: dict[str, bytes]


class ShardReader:
    """Random access to the samples of one shard. Opening it reads the tar headers only.

    A truncated shard keeps the samples before the damage; asking for one beyond it, or for one the
    index counts but the shard lacks, raises `SkipSample("truncated_shard")`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tar = tarfile.open(self.path, mode="r:")  # noqa: SIM115 - open while samples are read
        self._samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        try:
            for member in self._tar:
                self._add(member)
        except (tarfile.TarError, OSError, EOFError):
            pass  # truncated: the samples before the damage stay readable

    def _add(self, member: tarfile.TarInfo) -> None:
        if not member.isreg():
            return
        key, suffix = base_plus_ext(member.name)
        if key is None or member.name.rsplit("/", 1)[-1].startswith(("__", ".")):
            return
        if not self._samples or self._samples[-1][0] != key:
            self._samples.append((key, {}))
        self._samples[-1][1][suffix.lower()] = member

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, i: int) -> RawSample:
        if i >= len(self._samples):
            raise SkipSample("truncated_shard", f"{self.path} ends before sample {i}")
        key, members = self._samples[i]
        out = {}
        for suffix, member in members.items():
            if suffix.rsplit(".", 1)[-1] not in READABLE_EXTENSIONS:
                continue
            if member.size > MAX_MEMBER_BYTES:
                raise SkipSample("oversized_member", f"{member.name} has {member.size} bytes")
            try:
                data = self._tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as error:
                raise SkipSample("truncated_shard", f"{member.name}: {error}") from None
            if len(data) != member.size:
                raise SkipSample("truncated_shard", f"{member.name} is cut short")
            out[suffix] = data
        return RawSample(key, out)

    def close(self) -> None:
        self._tar.close()
