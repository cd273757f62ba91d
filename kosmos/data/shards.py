"""WebDataset corpora: tar shards (plain, `.tar.gz`, `.tar.zst`) and an index of their names and counts.

A sample is the run of consecutive tar members sharing a key (the member name up to the first dot of
its base name, as webdataset groups them); the rest of the name is the member's suffix (`txt`, `jpg`,
`0.png`). The index makes an epoch, and a position inside it, countable without reading the shards.
Its `base` says where the shards lie (default: beside the index; any location of `sources.py`).

Every reader of a shard (training, `kosmos data inspect`, tokenizer text, indexing) reads it in one
sequential pass (`read_samples`). Only members whose suffix ends in a text, JSON or image extension
are read; anything else (pickles included) is never touched.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Self

from kosmos.config import ConfigError
from kosmos.data import sources
from kosmos.data.skips import Counts, Reason, SkipSample, saved

INDEX_FILE = "index.json"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst")
SHARD_SUFFIXES = (".tar", *COMPRESSED_SUFFIXES)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
READABLE_EXTENSIONS = ("txt", "json", *IMAGE_EXTENSIONS)
# Refuse members larger than this without reading them.
MAX_MEMBER_BYTES = 64 << 20
INDEX_VERSION = 1


@dataclass
class ShardInfo:
    name: str
    samples: int
    # As the store reported them when the shard was counted (None: not recorded): a shard whose size
    # or ETag differs when it is read is another version, and is skipped as `shard_changed`.
    size: int | None = None
    etag: str | None = None

    @property
    def version(self) -> sources.Version:
        return sources.Version(self.size, self.etag)


@dataclass
class CorpusIndex:
    kind: str
    shards: list[ShardInfo]
    # Samples the builder left out, by reason (they are not in the shards).
    skipped: dict[str, int] = field(default_factory=dict)
    # Where shard names are relative to: a local folder or URL; "" = the index's own folder.
    base: str = ""
    # Read from a remote store: every shard name, full URLs included, must lie under the base.
    confined: bool = False

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def location(self, shard: str) -> str:
        """Where shard `shard` lies; raises `ShardUnreadable(Reason.PATH_OUTSIDE)` for a name escaping the base."""
        return sources.join(self.base, shard, self.confined)


class MissingIndex(ConfigError):
    """A corpus location where the store says there is no index."""


def index_location(folder: str | Path) -> str:
    return f"{str(folder).rstrip('/')}/{INDEX_FILE}"


def read_index(folder: str | Path, options: sources.ReadOptions = sources.DEFAULT_OPTIONS) -> CorpusIndex:
    """The index of the corpus at `folder` (a local folder or URL), its `base` made a full location."""
    folder = str(folder)
    location = index_location(folder)
    shown = sources.redact(location)
    if sources.is_pipe(folder):
        raise ConfigError(f"{sources.redact(folder)}: a corpus lies in a folder or at a URL, not a pipe: command")
    try:
        text = sources.read_bytes(location, options)
    except sources.ShardUnreadable as error:
        if error.missing:
            raise MissingIndex(
                f"{sources.redact(folder)}: no corpus index ({INDEX_FILE}): it does not exist or has no index"
            ) from None
        raise ConfigError(f"{shown}: cannot be read ({error.detail})") from None
    try:
        raw = json.loads(text)
        base = str(raw.get("base") or "")
        if sources.is_pipe(base):
            raise ConfigError(f"{shown}: base {sources.redact(base)} is a pipe: command, not a location")
        if not base:
            base = folder
        elif sources.is_local(folder) and not sources.is_url(base):
            base = os.path.normpath(os.path.join(sources.local_path(folder), base))
        elif not sources.is_url(base):
            base = sources.join(folder, base)
        return CorpusIndex(
            kind=raw["kind"],
            shards=[
                ShardInfo(
                    str(s["name"]),
                    int(s["samples"]),
                    None if s.get("size") is None else int(s["size"]),
                    None if s.get("etag") is None else str(s["etag"]),
                )
                for s in raw["shards"]
            ],
            skipped={str(k): int(v) for k, v in raw.get("skipped", {}).items()},
            base=base,
            confined=not sources.is_local(folder),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{shown}: not a corpus index ({type(error).__name__})") from None
    except sources.ShardUnreadable as error:
        raise ConfigError(f"{shown}: base {error.detail}") from None


def write_index(folder: str | Path, index: CorpusIndex) -> None:
    """`folder/index.json`; locations are written redacted (credentials come from the environment)."""
    raw = {
        "version": INDEX_VERSION,
        "kind": index.kind,
        **({"base": sources.redact(index.base)} if index.base else {}),
        "samples": index.num_samples,
        "shards": [
            {
                "name": sources.redact(s.name) if sources.is_url(s.name) else s.name,
                "samples": s.samples,
                **({"size": s.size} if s.size is not None else {}),
                **({"etag": s.etag} if s.etag else {}),
            }
            for s in index.shards
        ],
        "skipped": saved(index.skipped),
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
        self.skipped: Counts = Counter()
        self._tar = None  # the webdataset.TarWriter of the shard being written
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
        import webdataset  # imported when needed: it imports torch, which index reads do without

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
    # Why the sample cannot be used although its members were found (e.g. `oversized_member`).
    problem: SkipSample | None = None


class ShardDamaged(Exception):
    """A shard's tar stream (or its compression) breaks off or goes wrong after its good samples."""


def decompressed(file: BinaryIO, name: str) -> BinaryIO:
    """The tar stream of a shard file, by its name: `.tar.gz`/`.tgz` (gzip), `.tar.zst` (zstandard)."""
    path = sources.path_of(name)  # a query (a signed URL's token, say) is no part of the suffix
    if path.endswith((".tar.gz", ".tgz")):
        return gzip.GzipFile(fileobj=file, mode="rb")
    if path.endswith(".tar.zst"):
        try:
            import zstandard
        except ImportError:
            raise sources.ShardUnreadable(
                Reason.UNREADABLE_SHARD, f"{name}: reading .tar.zst needs the zstandard package"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(file, read_across_frames=True)
    return file


def split_member_name(name: str) -> tuple[str, str]:
    """(key, suffix): the key ends at the first dot of the base name, as webdataset splits names;
    the leading dots of a hidden name (`.KEY.jpg`) stay in its key."""
    folder, slash, base = name.rpartition("/")
    stem = base.lstrip(".")
    cut = len(base) - len(stem) + (stem.index(".") if "." in stem else len(stem))
    return folder + slash + base[:cut], base[cut + 1 :].lower()


def is_hidden(key: str) -> bool:
    return key.rpartition("/")[2].startswith((".", "__"))


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A member's bytes; one over MAX_MEMBER_BYTES is refused unread (`oversized_member`), one the
    file ends inside raises `ShardDamaged`."""
    if member.size > MAX_MEMBER_BYTES:
        raise SkipSample(Reason.OVERSIZED_MEMBER, f"{member.name} has {member.size} bytes")
    try:
        data = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ShardDamaged(f"{member.name}: {error}") from None
    if len(data) != member.size:
        raise ShardDamaged(f"{member.name} is cut short")
    return data


def _is_sample_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    if not member.isreg():
        return None
    key, suffix = split_member_name(member.name)
    if not suffix or is_hidden(key):
        return None
    return key, suffix


def read_samples(file: BinaryIO, name: str) -> Iterator[RawSample]:
    """The samples of a shard in file order, in one sequential pass. Raises `ShardDamaged` where the
    stream breaks off or a header is malformed (the sample being read there is lost with it)."""
    key, members, problem = None, {}, None
    stream = decompressed(file, name)
    # A seekable plain tar is read without tarfile's stream buffer (faster); still front to back.
    mode = "r:" if stream is file and file.seekable() else "r|"
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                found = _is_sample_member(member)
                if found is None:
                    continue
                if found[0] != key:
                    if key is not None:
                        yield RawSample(key, members, problem)
                    key, members, problem = found[0], {}, None
                suffix = found[1]
                if suffix.rsplit(".", 1)[-1] not in READABLE_EXTENSIONS:
                    continue
                try:
                    members[suffix] = read_member(tar, member)
                except SkipSample as skip:
                    problem = skip
            if key is not None:
                yield RawSample(key, members, problem)
            # tarfile ends an archive quietly at a header it cannot parse; data after it is damage.
            while rest := tar.fileobj.read(1 << 20):
                if rest.strip(b"\0"):
                    raise ShardDamaged(f"unreadable tar header at byte {tar.offset}")
    except ShardDamaged:
        raise
    except Exception as error:  # noqa: BLE001 - tarfile, gzip and zstandard raise many types on bad data
        raise ShardDamaged(f"{type(error).__name__}: {error}") from None
