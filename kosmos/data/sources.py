"""Where shards lie and how their bytes arrive: local paths, fsspec URLs and (opt-in) `pipe:` commands.

A shard's location is its index's base joined with its name, or its name alone when that is a full
URL or `pipe:` command. Local shards are opened in place. Remote shards are downloaded whole, in one
sequential pass, into a bounded local cache (`ShardCache`), ahead of need when asked to prefetch;
transient errors (connection resets, timeouts, 5xx, throttling) are retried with backoff, resuming
from the bytes already received where the source allows it. A shard that cannot be had is reported
as `ShardUnreadable` with a reason, never as a crash. Credentials come from the environment the way
fsspec and its backends read them (e.g. `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`); messages show
locations without user info or query strings.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

from kosmos.data.skips import Reason

CHUNK_BYTES = 8 << 20
PIPE = "pipe:"


class ShardUnreadable(Exception):
    """A shard whose bytes cannot be had; `reason` is the counter its samples are skipped under."""

    def __init__(self, reason: str, detail: str):
        detail = scrub(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ReadOptions:
    allow_pipe: bool = False
    retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 300.0
    cache_bytes: int = 8 << 30
    cache_dir: str | None = None
    fetch_threads: int = 4


DEFAULT_OPTIONS = ReadOptions()


def is_url(location: str) -> bool:
    return "://" in location


def is_pipe(location: str) -> bool:
    return location.startswith(PIPE)


def is_local(location: str) -> bool:
    return not is_pipe(location) and (not is_url(location) or location.startswith("file://"))


def local_path(location: str) -> str:
    return location.removeprefix("file://")


def protocol(location: str) -> str:
    return "pipe" if is_pipe(location) else location.split("://", 1)[0] if is_url(location) else "file"


def join(base: str, name: str) -> str:
    """The location of shard `name` of an index based at `base`. A relative name must stay inside
    the base (`ShardUnreadable(Reason.PATH_OUTSIDE)` otherwise); a full URL or `pipe:` name stands alone."""
    if is_url(name) or is_pipe(name):
        return name
    normal = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or normal == ".." or normal.startswith("../") or "\\" in name:
        raise ShardUnreadable(Reason.PATH_OUTSIDE, f"{name!r} is not inside {redact(base)}")
    return f"{base.rstrip('/')}/{normal}"


def parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0] if "/" in location.rstrip("/") else "."


def redact(location: str) -> str:
    """A location fit for logs: no user info, query or fragment (they may carry credentials)."""
    if is_pipe(location):
        words = location[len(PIPE) :].split()
        return f"{PIPE}{words[0] if words else ''} ..."
    if not is_url(location):
        return location
    parts = urlsplit(location)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def scrub(text: str) -> str:
    """`text` (an error message, say) with every URL in it redacted."""
    return re.sub(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", lambda m: redact(m.group(0)), text)


def warn(message: str) -> None:
    print(f"kosmos data: {scrub(message)}", file=sys.stderr, flush=True)


# -- reading ----------------------------------------------------------------------------------------


def _permanent(error: BaseException) -> bool:
    """Errors that retrying cannot fix: missing files, refused access, client errors other than 408/429."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    status = getattr(error, "status", None) or getattr(error, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _with_retries(location: str, options: ReadOptions, attempt_once):
    """`attempt_once()`, retried with exponential backoff on transient errors."""
    for attempt in range(options.retries + 1):
        try:
            return attempt_once()
        except ShardUnreadable:
            raise
        except Exception as error:  # noqa: BLE001 - backends raise many types; all are judged here
            what = f"{type(error).__name__}: {error}"
            if _permanent(error):
                raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: {what}") from None
            if attempt == options.retries:
                raise ShardUnreadable(
                    Reason.UNREADABLE_SHARD, f"{redact(location)}: {what} (after {attempt + 1} tries)"
                ) from None
            delay = options.backoff_s * 2**attempt
            warn(f"{redact(location)}: {what}; retrying in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(location: str, options: ReadOptions = DEFAULT_OPTIONS) -> bytes:
    """A small file (an index, a stats file) whole, with retries."""
    if is_pipe(location):
        raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: only shards may be pipe: commands")
    if is_local(location):
        with open(local_path(location), "rb") as file:
            return file.read()
    import fsspec

    def attempt() -> bytes:
        with fsspec.open(location, "rb") as file:
            return file.read()

    return _with_retries(location, options, attempt)


def exists(location: str) -> bool:
    if is_local(location):
        return os.path.isfile(local_path(location))
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    try:
        return fs.isfile(path)
    except FileNotFoundError:
        return False


def open_local(location: str) -> BinaryIO:
    """A local shard, opened only if it is a regular file (a FIFO or a device would block the reader)."""
    path = local_path(location)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{path}: not a regular file")
        return open(path, "rb")
    except OSError as error:
        raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{path}: {type(error).__name__}: {error}") from None


def download(location: str, dest: str, options: ReadOptions) -> int:
    """Copy a remote shard or a `pipe:` command's output to `dest`; returns its size in bytes."""
    if is_pipe(location):
        return _run_pipe(location, dest, options)
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    received = 0
    with open(dest, "wb") as out:

        def attempt() -> int:
            nonlocal received
            with fs.open(path, "rb", block_size=CHUNK_BYTES) as source:
                if received:
                    try:
                        source.seek(received)
                    except (OSError, ValueError, NotImplementedError):
                        out.seek(0)
                        out.truncate()
                        received = 0
                while chunk := source.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
            return received

        return _with_retries(location, options, attempt)


def _run_pipe(location: str, dest: str, options: ReadOptions) -> int:
    if not options.allow_pipe:
        raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: pipe: commands need data.allow_pipe")

    def attempt() -> int:
        with open(dest, "wb") as out:
            done = subprocess.run(
                location[len(PIPE) :],
                check=False,
                shell=True,
                stdout=out,
                stderr=subprocess.PIPE,
                timeout=options.timeout_s,
            )
        if done.returncode:
            raise OSError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[-200:]}")
        return os.path.getsize(dest)

    return _with_retries(location, options, attempt)


class ShardCache:
    """Remote shards fetched whole onto local disk by a few threads, at most `cache_bytes` kept
    (least recently used out first; a file still being read stays readable after it is removed)."""

    def __init__(self, root: str | None, options: ReadOptions):
        self.options = options
        self.folder = tempfile.mkdtemp(prefix=f"shards-{os.getpid()}-", dir=root or options.cache_dir)
        self.entries: OrderedDict[str, Future] = OrderedDict()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(options.fetch_threads, thread_name_prefix="kosmos-fetch")
        self.count = 0

    def prefetch(self, location: str) -> Future:
        with self.lock:
            if location in self.entries:
                self.entries.move_to_end(location)
                return self.entries[location]
            self.count += 1
            dest = os.path.join(self.folder, f"{self.count:08d}")
            future = self.pool.submit(self._fetch, location, dest)
            self.entries[location] = future
            return future

    def _fetch(self, location: str, dest: str) -> tuple[str, int]:
        return dest, download(location, dest, self.options)

    def open(self, location: str) -> BinaryIO:
        future = self.prefetch(location)
        try:
            dest, _ = future.result(timeout=self.options.timeout_s)
            file = open(dest, "rb")  # noqa: SIM115 - the caller reads and closes it
        except FutureTimeout:
            self._forget(location)
            raise ShardUnreadable(
                Reason.UNREADABLE_SHARD, f"{redact(location)}: no data after {self.options.timeout_s:g} s"
            ) from None
        except ShardUnreadable:
            self._forget(location)
            raise
        except OSError as error:
            self._forget(location)
            raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: {error}") from None
        self._evict(keep=location)
        return file

    def _forget(self, location: str) -> None:
        with self.lock:
            self.entries.pop(location, None)

    def _evict(self, keep: str) -> None:
        with self.lock:
            done = [(loc, f.result()) for loc, f in self.entries.items() if f.done() and not f.exception()]
            total = sum(size for _, (_, size) in done)
            for location, (dest, size) in done:
                if total <= self.options.cache_bytes:
                    break
                if location == keep:
                    continue
                del self.entries[location]
                os.remove(dest)
                total -= size

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)
