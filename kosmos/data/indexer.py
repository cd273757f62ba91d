"""`kosmos data index`: an index for WebDataset shards where they lie, so nothing has to be copied.

Each source is a shard, a folder (or URL prefix) of shards, or a glob. A shard's count is read from
img2dataset's `STEM_stats.json` beside it (`successes`) when there is one, else from one streaming
pass over its tar headers. Counts are claims the loader checks as it reads: a shard that holds fewer
or more samples than its count has the difference counted by reason.
"""

from __future__ import annotations

import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kosmos.config import ConfigError
from kosmos.data import sources
from kosmos.data.shards import INDEX_FILE, SHARD_SUFFIXES, CorpusIndex, ShardInfo, read_samples, write_index

READ_THREADS = 16


def _is_shard(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def list_shards(source: str) -> list[str]:
    """The shard locations `source` names, sorted."""
    if sources.is_local(source):
        path = sources.local_path(source)
        if any(c in path for c in "*?["):
            found = glob.glob(path)
        elif os.path.isdir(path):
            found = [os.path.join(path, name) for name in os.listdir(path)]
        else:
            found = [path] if os.path.isfile(path) else []
        return sorted(os.path.abspath(p) for p in found if _is_shard(p))
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    if _is_shard(path):
        found = [path]
    elif any(c in path for c in "*?["):
        found = fs.glob(path)
    else:
        found = fs.ls(path, detail=False)
    return sorted(fs.unstrip_protocol(p) if "://" not in p else p for p in found if _is_shard(p))


def stem(location: str) -> str:
    return next(location[: -len(s)] for s in SHARD_SUFFIXES if location.endswith(s))


def count_samples(location: str, options: sources.ReadOptions) -> tuple[int, str]:
    """The shard's sample count and where it came from (`stats` or `headers`)."""
    try:
        stats = json.loads(sources.read_bytes(f"{stem(location)}_stats.json", options))
        return int(stats["successes"]), "stats"
    except (OSError, sources.ShardUnreadable, ValueError, KeyError, TypeError):
        pass
    count = 0
    try:
        if sources.is_local(location):
            file = sources.open_local(location)
        else:
            import fsspec

            file = fsspec.open(location, "rb").open()
        with file:
            for _ in read_samples(file, location):
                count += 1
    except Exception as error:  # noqa: BLE001 - an unreadable or damaged shard keeps what was counted
        sources.warn(
            f"{sources.redact(location)}: counted {count} samples, then {type(error).__name__}: {error}"
        )
    return count, "headers"


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
    from stats files and from tar headers."""
    if (out / INDEX_FILE).exists():
        raise ConfigError(f"--out: {out} already has an index ({INDEX_FILE})")
    locations: list[str] = []
    for src in srcs:
        found = list_shards(src)
        if not found:
            raise ConfigError(f"SRC: no shards ({', '.join(SHARD_SUFFIXES)}) at {sources.redact(src)}")
        locations += [loc for loc in found if loc not in locations]
    base = common_base(locations)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        counts = list(pool.map(lambda loc: count_samples(loc, options), locations))
    names = [loc[len(base) + 1 :] if base else loc for loc in locations]
    out.mkdir(parents=True, exist_ok=True)
    in_place = sources.is_local(base) and os.path.abspath(base) == str(out.resolve())
    index = CorpusIndex(
        kind, [ShardInfo(n, c) for n, (c, _) in zip(names, counts)], base="" if in_place else base
    )
    write_index(out, index)
    origins = {"stats": 0, "headers": 0}
    for _, origin in counts:
        origins[origin] += 1
    return index, origins
