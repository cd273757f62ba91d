"""`kosmos data index`: an index for WebDataset shards where they lie, so nothing has to be copied.

Each source is a shard, a folder (or URL prefix) of shards, or a glob. A shard's count is read from
img2dataset's `STEM_stats.json` beside it (`successes`) when there is one, else from one streaming
pass over its tar headers (a remote shard is downloaded for it, through the retry policy of
`sources.py`). Each shard's size and ETag are recorded, so that the loader knows a changed shard.
Counts are claims the loader checks as it reads: a shard that holds fewer or more samples than its
count has the difference counted by reason. A shard that cannot be counted stops the indexing.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from tqdm import tqdm

from kosmos.config import ConfigError
from kosmos.data import sources
from kosmos.data.config import check_protocol
from kosmos.data.shards import (
    INDEX_FILE,
    SHARD_SUFFIXES,
    CorpusIndex,
    MissingIndex,
    ShardDamaged,
    ShardInfo,
    read_index,
    read_samples,
    write_index,
)

READ_THREADS = 16


def _is_shard(name: str) -> bool:
    return sources.path_of(name).endswith(SHARD_SUFFIXES)


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def list_shards(source: str, options: sources.ReadOptions = sources.DEFAULT_OPTIONS) -> list[str]:
    """The shard locations `source` (a shard, a folder or URL prefix, or a glob) names, sorted."""
    if sources.is_pipe(source):
        raise ConfigError(f"SRC: {sources.redact(source)} is a pipe: command; only stored shards are indexed")
    if sources.is_local(source):
        path = sources.local_path(source)
        if _has_glob(path):
            found = glob.glob(path)
        elif os.path.isdir(path):
            found = [os.path.join(path, name) for name in os.listdir(path)]
        else:
            found = [path] if os.path.isfile(path) else []
        return sorted(os.path.abspath(p) for p in found if _is_shard(p))
    check_protocol(source, "SRC")
    fs, path = sources.filesystem(source, options)
    if _has_glob(sources.path_of(source)):
        found = sources.with_retries(source, options, lambda: fs.glob(path))
    elif _is_shard(path):
        found = [path]
    else:
        found = sources.with_retries(source, options, lambda: fs.ls(path, detail=False))
    return sorted(fs.unstrip_protocol(p) if "://" not in p else p for p in found if _is_shard(p))


def stem(location: str) -> str:
    return next(location[: -len(s)] for s in SHARD_SUFFIXES if location.endswith(s))


class Counted(NamedTuple):
    samples: int
    origin: str  # where the count came from: `stats` (img2dataset's file) or `headers` (the tar)
    version: sources.Version


def count_samples(location: str, options: sources.ReadOptions) -> Counted:
    """The shard's sample count, where it came from, and its size and ETag. A shard that cannot be
    read, or is not a tar stream at all, raises `ShardUnreadable`: no count is guessed."""
    try:
        if sources.is_url(location) and urlsplit(location).query:
            raise ValueError("a signed URL names no stats file beside it")
        stats = json.loads(sources.read_bytes(f"{stem(location)}_stats.json", options))
        return Counted(int(stats["successes"]), "stats", sources.version_of(location, options))
    except sources.ShardUnreadable as error:
        if not error.missing:
            raise
    except (ValueError, KeyError, TypeError):
        pass  # no img2dataset stats: the tar headers tell
    if sources.is_local(location):
        with sources.open_local(location) as file:
            return Counted(_count_tar(file, location), "headers", sources.version_of(location))
    with tempfile.TemporaryDirectory(prefix="kosmos-index-") as folder:
        copy = os.path.join(folder, "shard")
        version = sources.download(location, copy, options)
        with open(copy, "rb") as file:
            return Counted(_count_tar(file, location), "headers", version)


def _count_tar(file, location: str) -> int:
    count = 0
    try:
        for _ in read_samples(file, location):
            count += 1
    except ShardDamaged as error:
        if count == 0:
            raise sources.ShardUnreadable("unreadable_shard", f"{location}: not a tar stream ({error})") from None
        # The samples before the damage are the shard's; the loader counts the rest as truncated.
        sources.warn(f"{sources.redact(location)}: counted {count} samples, then {error}")
    return count


def common_base(locations: list[str]) -> str:
    parents = {sources.parent(loc) for loc in locations}
    if len(parents) == 1:
        return parents.pop()
    if all(sources.is_local(loc) for loc in locations):
        return os.path.commonpath(locations)
    prefix = os.path.commonprefix(locations)
    return prefix[: prefix.rfind("/")] if "/" in prefix.split("://", 1)[-1] else ""


def index_shards(
    srcs: list[str], out: Path, kind: str, options: sources.ReadOptions = sources.DEFAULT_OPTIONS
) -> tuple[CorpusIndex, dict[str, int]]:
    """Write `out/index.json` for the shards `srcs` name; returns the index and how many counts came
    from stats files and from tar headers. A shard that cannot be counted stops it (ConfigError
    naming every such shard) before anything is written."""
    if (out / INDEX_FILE).exists():
        raise ConfigError(f"--out: {out} already has an index ({INDEX_FILE})")
    locations: list[str] = []
    for src in srcs:
        try:
            found = list_shards(src, options)
        except sources.ShardUnreadable as error:
            raise ConfigError(f"SRC: {error.detail}") from None
        if not found:
            raise ConfigError(f"SRC: no shards ({', '.join(SHARD_SUFFIXES)}) at {sources.redact(src)}")
        locations += [loc for loc in found if loc not in locations]
    base = common_base(locations)

    def count(location: str) -> Counted | sources.ShardUnreadable:
        try:
            return count_samples(location, options)
        except sources.ShardUnreadable as error:
            return error

    with ThreadPoolExecutor(READ_THREADS) as pool:
        counted = pool.map(count, locations)
        # A bar where a terminal watches: counting a large remote corpus takes minutes.
        counts = list(tqdm(counted, total=len(locations), unit="shard", desc="kosmos data index", disable=None))
    failed = [error for error in counts if isinstance(error, sources.ShardUnreadable)]
    if failed:
        raise ConfigError(
            f"SRC: {len(failed)} of {len(locations)} shards could not be counted, so no index was written: "
            + "; ".join(error.detail for error in failed[:5])
            + ("; ..." if len(failed) > 5 else "")
        )
    names = [loc[len(base) + 1 :] if base else loc for loc in locations]
    out.mkdir(parents=True, exist_ok=True)
    in_place = sources.is_local(base) and os.path.abspath(base) == str(out.resolve())
    shards = [ShardInfo(n, c.samples, c.version.size, c.version.etag) for n, c in zip(names, counts)]
    index = CorpusIndex(kind, shards, base="" if in_place else base)
    write_index(out, index)
    origins = {"stats": 0, "headers": 0}
    for counted in counts:
        origins[counted.origin] += 1
    return index, origins


def listed_index(location: str, kind: str = "caption") -> CorpusIndex:
    """The index of the corpus at `location`, or, where there is none but shards lie there (a folder
    or URL prefix of img2dataset's output, say), those shards as `list_shards` finds them, their
    counts unknown (0), read as `kind`: for a look at a corpus that was never indexed."""
    try:
        return read_index(location)
    except MissingIndex:
        found = list_shards(location)
        if not found:
            raise
    base = common_base(found)
    return CorpusIndex(kind, [ShardInfo(loc[len(base) + 1 :] if base else loc, 0) for loc in found], base=base)
