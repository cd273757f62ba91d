"""Where shards lie and how their bytes arrive: local paths, fsspec URLs and (opt-in) `pipe:` commands.

A shard's location is its index's base joined with its name, or its name alone when that is a full
URL or `pipe:` command. Local shards are opened in place. Remote shards are downloaded whole, in one
sequential pass, into a bounded local cache (`ShardCache`), ahead of need when asked to prefetch.
HTTP(S) is read with the standard library (one GET per download, a range only to resume it); other
stores through fsspec (s3fs, gcsfs).

Every remote read (an index, a stats file, a listing, a shard's bytes) goes through one retry policy,
`with_retries`: connection errors, timeouts (no byte for `read_timeout_s`), 408, 429 and 5xx answers
are retried with exponential backoff and jitter, waiting what a `Retry-After` asks, for as long as
`retry_s` allows in all; 401, 403, 404 and other client errors are not retried. A shard that cannot be
had is reported as `ShardUnreadable` with a reason, never as a crash. A shard whose size or ETag differs
from what its index recorded is `shard_changed`: its samples are another version's.

Credentials come from the environment the way fsspec and its backends read them (e.g.
`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`), and for HTTP from the URL's user info or `~/.netrc`.
Messages and files show locations through `redact`: no user info, query or fragment.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import http.client
import io
import netrc
import os
import posixpath
import queue
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

from kosmos.data.skips import Reason

CHUNK_BYTES = 8 << 20
PIPE = "pipe:"
# Backoff between tries of a transient error: the first wait, doubling up to the longest (or a quarter
# of the retry budget, if less), each drawn between half and all of it, so that the many readers one
# outage hits do not all come back at once.
FIRST_BACKOFF_S = 1.0
LONGEST_BACKOFF_S = 30.0


class ShardUnreadable(Exception):
    """A shard whose bytes cannot be had; `reason` is the counter its samples are skipped under;
    `missing`: the store says there is no such object (404, no such key or file)."""

    def __init__(self, reason: str, detail: str, missing: bool = False):
        detail = scrub(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.missing = missing


@dataclass(frozen=True)
class ReadOptions:
    allow_pipe: bool = False
    # Transient errors of one read are retried for this long in all (backoff waits included).
    retry_s: float = 600.0
    # A connection, or a read on it, that gets nothing for this long fails (and is retried).
    timeout_s: float = 60.0
    cache_bytes: int = 8 << 30
    cache_dir: str | None = None
    fetch_threads: int = 4


DEFAULT_OPTIONS = ReadOptions()


class Version(NamedTuple):
    """What a store says of an object: its size in bytes and, where it gives one, its ETag."""

    size: int | None
    etag: str | None


def is_url(location: str) -> bool:
    return "://" in location


def is_pipe(location: str) -> bool:
    return location.startswith(PIPE)


def is_local(location: str) -> bool:
    return not is_pipe(location) and (not is_url(location) or location.startswith("file://"))


def is_http(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def local_path(location: str) -> str:
    return location.removeprefix("file://")


def protocol(location: str) -> str:
    return "pipe" if is_pipe(location) else location.split("://", 1)[0] if is_url(location) else "file"


def path_of(location: str) -> str:
    """The location without query or fragment: what its suffix (`.tar.gz`, ...) is read from."""
    return urlsplit(location).path if is_url(location) else location


def join(base: str, name: str, confined: bool = False) -> str:
    """The location of shard `name` of an index based at `base`. A relative name must stay inside
    the base (`ShardUnreadable(Reason.PATH_OUTSIDE)` otherwise); a full URL or `pipe:` name stands alone,
    unless `confined` (the index was read from a remote store): then it too must lie under the base."""
    if "\0" in name or not name.strip():
        raise ShardUnreadable(Reason.PATH_OUTSIDE, f"{name!r} is not a shard name")
    if is_url(name) or is_pipe(name):
        if confined and not (is_url(name) and name.startswith(base.rstrip("/") + "/")):
            raise ShardUnreadable(Reason.PATH_OUTSIDE, f"{redact(name)!r} is not under {redact(base)}")
        if confined and ".." in urlsplit(name).path.split("/"):
            raise ShardUnreadable(Reason.PATH_OUTSIDE, f"{redact(name)!r} is not under {redact(base)}")
        return name
    normal = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or normal == ".." or normal.startswith("../") or "\\" in name:
        raise ShardUnreadable(Reason.PATH_OUTSIDE, f"{name!r} is not inside {redact(base)}")
    return f"{base.rstrip('/')}/{normal}"


def parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0] if "/" in location.rstrip("/") else "."


def redact(location: str) -> str:
    """A location fit for logs and files: no user info, query or fragment (they may carry credentials)."""
    if is_pipe(location):
        words = location[len(PIPE) :].split()
        return f"{PIPE}{words[0] if words else ''} ..."
    if not is_url(location):
        return location
    try:
        parts = urlsplit(location)
    except ValueError:  # e.g. an unclosed IPv6 bracket: keep nothing past the scheme's host part
        return location.split("://", 1)[0] + "://(unparsable location)"
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


URL_PATTERN = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+")


def scrub(text: str) -> str:
    """`text` (an error message, say) with every URL in it redacted."""
    return URL_PATTERN.sub(lambda m: redact(m.group(0)), text)


def scrubbed(data):
    """`data` (a config or record: dicts, lists, strings, numbers) with every URL in its strings redacted."""
    if isinstance(data, str):
        return scrub(data)
    if isinstance(data, dict):
        return {key: scrubbed(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrubbed(value) for value in data]
    return data


def warn(message: str) -> None:
    print(f"kosmos data: {scrub(message)}", file=sys.stderr, flush=True)


# -- the retry policy -------------------------------------------------------------------------------


class Stopped(Exception):
    """The read was abandoned: its cache closed while it was under way."""


def _chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from (backends wrap the answer's error in their own)."""
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 8:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _status(error: BaseException) -> int | None:
    """The HTTP status an error reports, whichever client raised it (urllib, aiohttp, botocore)."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    for name in ("status", "code"):
        status = getattr(error, name, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    return None


def _retry_after(error: BaseException) -> float | None:
    """The wait an answer's `Retry-After` asks for (seconds or an HTTP date), if it gives one."""
    headers = getattr(error, "headers", None)
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders")
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def is_transient(error: BaseException) -> bool:
    """Whether trying again may succeed: connection errors, timeouts, 408, 429 and 5xx answers."""
    chain = _chain(error)
    for each in chain:
        status = _status(each)
        if status is not None:
            return status in (408, 429) or status >= 500
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        # fsspec's HTTP filesystem says FileNotFoundError for any failed answer; only its cause tells
        return any(isinstance(e, (OSError, http.client.HTTPException)) for e in chain[1:]) and not any(
            isinstance(e, (FileNotFoundError, PermissionError)) for e in chain[1:]
        )
    return isinstance(error, (OSError, http.client.HTTPException, TimeoutError, ConnectionError)) or (
        type(error).__module__.split(".")[0] in ("aiohttp", "botocore", "urllib3")
    )


def _is_missing(error: BaseException) -> bool:
    return any(isinstance(e, FileNotFoundError) or _status(e) in (404, 410) for e in _chain(error))


def describe(error: BaseException) -> str:
    status = next((s for s in map(_status, _chain(error)) if s is not None), None)
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {status} {error.reason}"
    text = f"{type(error).__name__}: {error}"
    return f"HTTP {status} ({text})" if status is not None else text


def with_retries(location: str, options: ReadOptions, attempt, stop: threading.Event | None = None):
    """`attempt()`, tried again on transient errors (see the module's docstring) until it succeeds or
    `options.retry_s` is spent; a permanent error, or the last transient one, raises `ShardUnreadable`."""
    started = time.monotonic()
    for tries in range(1, 1 << 30):
        try:
            return attempt()
        except (ShardUnreadable, Stopped):
            raise
        except Exception as error:  # noqa: BLE001 - backends raise many types; all are judged here
            shown = f"{redact(location)}: {describe(error)}"
            if not is_transient(error):
                raise ShardUnreadable(Reason.UNREADABLE_SHARD, shown, missing=_is_missing(error)) from None
            asked = _retry_after(error)
            longest = min(LONGEST_BACKOFF_S, options.retry_s / 4)
            backoff = min(longest, FIRST_BACKOFF_S * 2 ** (tries - 1))
            delay = asked if asked is not None else backoff * random.uniform(0.5, 1.0)
            spent = time.monotonic() - started
            if spent + delay > options.retry_s:
                raise ShardUnreadable(
                    Reason.UNREADABLE_SHARD,
                    f"{shown} (still failing after {tries} tries in {spent:.0f} s, data.read_retry_s "
                    f"{options.retry_s:g})",
                ) from None
            warn(f"{shown}; retrying in {delay:.1f} s")
            if stop is not None and stop.wait(delay):
                raise Stopped(location)
            if stop is None:
                time.sleep(delay)
    raise AssertionError("unreachable")


# -- HTTP -------------------------------------------------------------------------------------------


def _http_request(location: str, options: ReadOptions, method: str = "GET", headers: dict | None = None):
    """An answered request (urllib raises `HTTPError` for 4xx and 5xx), with the URL's user info or
    `~/.netrc`'s entry for its host as basic credentials; the timeout bounds every wait on the socket."""
    parts = urlsplit(location)
    host = parts.hostname or ""
    url = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, parts.query, ""))
    sent = {"Accept-Encoding": "identity", "User-Agent": "kosmos", **(headers or {})}
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
    else:
        try:
            found = netrc.netrc().authenticators(host)
        except (OSError, netrc.NetrcParseError):
            found = None
        user, password = (found[0], found[2]) if found else (None, None)
    if user is not None:
        sent["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.request.urlopen(
        urllib.request.Request(url, headers=sent, method=method), timeout=options.timeout_s
    )


def _http_version(response) -> Version:
    total = None
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        total = int(content_range.rsplit("/", 1)[1])
    elif response.status == 200 and (length := response.headers.get("Content-Length", "")).isdigit():
        total = int(length)
    return Version(total, response.headers.get("ETag"))


def _copy_http(location: str, out: BinaryIO, options: ReadOptions, expect: Version | None, stop) -> Version:
    received = 0
    version: Version | None = None

    def attempt() -> Version:
        nonlocal received, version
        headers = {}
        if received:
            headers["Range"] = f"bytes={received}-"
            if version is not None and version.etag:
                headers["If-Range"] = version.etag  # a changed object comes whole, from the start
        with _http_request(location, options, headers=headers) as response:
            now = _http_version(response)
            if received and (response.status != 206 or (now.etag and now.etag != version.etag)):
                # The server ignored the range, or the object changed: read it again from the start
                # (a 206 of a changed object is thrown away first, so no two versions are mixed).
                out.seek(0)
                out.truncate()
                received = 0
                if response.status == 206:
                    version = None
                    raise ConnectionError("the object changed while it was read; reading it again")
            version = now
            _check_version(location, expect, now)
            received += _copy(response, out, location, stop)
        if now.size is not None and received != now.size:
            raise ConnectionError(f"the answer ended after {received} of {now.size} bytes")
        return Version(received, now.etag)

    return with_retries(location, options, attempt, stop)


def _copy(source, out, location: str, stop: threading.Event | None) -> int:
    """Copy `source` into `out` chunk by chunk, stopping at once when `stop` is set; bytes copied."""
    copied = 0
    while chunk := source.read(CHUNK_BYTES):
        if stop is not None and stop.is_set():
            raise Stopped(location)
        out.write(chunk)
        copied += len(chunk)
    return copied


def _check_version(location: str, expect: Version | None, now: Version) -> None:
    if expect is None:
        return
    if expect.size is not None and now.size is not None and expect.size != now.size:
        raise ShardUnreadable(
            Reason.SHARD_CHANGED, f"{redact(location)} has {now.size} bytes, the index says {expect.size}"
        )
    if expect.etag and now.etag and expect.etag != now.etag:
        raise ShardUnreadable(
            Reason.SHARD_CHANGED, f"{redact(location)} has ETag {now.etag}, the index says {expect.etag}"
        )


# -- other stores, through fsspec ---------------------------------------------------------------------


def filesystem(location: str, options: ReadOptions = DEFAULT_OPTIONS):
    """fsspec's filesystem for `location` and the path in it, with every wait bounded by the timeout."""
    import fsspec

    name = protocol(location)
    kwargs: dict = {}
    if name in ("s3", "s3a"):
        seconds = options.timeout_s
        kwargs["config_kwargs"] = {"connect_timeout": seconds, "read_timeout": seconds}
    elif name in ("http", "https"):
        import aiohttp

        kwargs["client_kwargs"] = {
            "timeout": aiohttp.ClientTimeout(sock_connect=options.timeout_s, sock_read=options.timeout_s)
        }
    return fsspec.core.url_to_fs(location, **kwargs)


def _etag(info: dict) -> str | None:
    return info.get("ETag") or info.get("etag") or None


def _copy_fsspec(location: str, out: BinaryIO, options: ReadOptions, expect: Version | None, stop) -> Version:
    fs, path = filesystem(location, options)
    received = 0
    version: Version | None = None

    def attempt() -> Version:
        nonlocal received, version
        info = fs.info(path)
        now = Version(info.get("size"), _etag(info))
        if received and now != version:  # changed since the last try: start again, one version whole
            out.seek(0)
            out.truncate()
            received = 0
        version = now
        _check_version(location, expect, now)
        with fs.open(path, "rb", block_size=CHUNK_BYTES) as source:
            source.seek(received)
            received += _copy(source, out, location, stop)
        if now.size is not None and received != now.size:
            raise ConnectionError(f"the object ended after {received} of {now.size} bytes")
        return Version(received, now.etag)

    return with_retries(location, options, attempt, stop)


# -- reading ----------------------------------------------------------------------------------------


def read_bytes(location: str, options: ReadOptions = DEFAULT_OPTIONS) -> bytes:
    """A small file (an index, a stats file) whole, with retries."""
    if is_pipe(location):
        raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: only shards may be pipe: commands")
    if is_local(location):
        try:
            with open(local_path(location), "rb") as file:
                return file.read()
        except OSError as error:
            raise ShardUnreadable(
                Reason.UNREADABLE_SHARD,
                f"{location}: {describe(error)}",
                missing=isinstance(error, FileNotFoundError),
            ) from None
    out = io.BytesIO()
    copy = _copy_http if is_http(location) else _copy_fsspec
    copy(location, out, options, None, None)
    return out.getvalue()


def version_of(location: str, options: ReadOptions = DEFAULT_OPTIONS) -> Version:
    """The object's size and ETag, as its store reports them now."""
    if is_local(location):
        return Version(os.path.getsize(local_path(location)), None)
    if is_http(location):

        def attempt() -> Version:
            with _http_request(location, options, method="HEAD") as response:
                return _http_version(response)

        return with_retries(location, options, attempt)
    fs, path = filesystem(location, options)
    info = with_retries(location, options, lambda: fs.info(path))
    return Version(info.get("size"), _etag(info))


def open_local(location: str, expect: Version | None = None) -> BinaryIO:
    """A local shard, opened only if it is a regular file (a FIFO or a device would block the reader)."""
    path = local_path(location)
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{path}: not a regular file")
        _check_version(path, expect, Version(status.st_size, None))
        return open(path, "rb")
    except OSError as error:
        raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{path}: {type(error).__name__}: {error}") from None


def download(
    location: str,
    dest: str,
    options: ReadOptions,
    expect: Version | None = None,
    stop: threading.Event | None = None,
) -> Version:
    """Copy a remote shard or a `pipe:` command's output to `dest`; returns its size and ETag.
    `expect` (the index's record) makes a changed shard `shard_changed`; `stop` abandons the copy."""
    with open(dest, "wb") as out:
        if is_pipe(location):
            return _run_pipe(location, out, options)
        copy = _copy_http if is_http(location) else _copy_fsspec
        return copy(location, out, options, expect, stop)


def _run_pipe(location: str, out: BinaryIO, options: ReadOptions) -> Version:
    if not options.allow_pipe:
        raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: pipe: commands need data.allow_pipe")

    def attempt() -> Version:
        out.seek(0)
        out.truncate()
        done = subprocess.run(
            location[len(PIPE) :],
            check=False,
            shell=True,
            stdout=out,
            stderr=subprocess.PIPE,
        )  # no deadline: the command's own (e.g. `aws s3 cp --cli-read-timeout`) applies
        if done.returncode:
            raise OSError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[-200:]}")
        out.flush()
        return Version(os.fstat(out.fileno()).st_size, None)

    return with_retries(location, options, attempt)


class _Entry:
    """One shard in the cache: its download, its file, its size (reserved from the index's record
    until it is known), whether a thread has taken its download on, and how many readers have it open."""

    def __init__(self, dest: str, size: int | None):
        self.future: Future = Future()
        self.dest = dest
        self.size = size or 0
        self.claimed = False
        self.readers = 0


class _CachedFile(io.FileIO):
    """A cached shard's file that tells the cache when its reader is done with it."""

    def __init__(self, path: str, on_close):
        super().__init__(path, "rb")
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._on_close()


class ShardCache:
    """Remote shards fetched whole onto local disk, ahead of need by a few threads, or by the reader
    itself when it needs one whose download has not started (so a reader never queues behind stalled
    downloads). On disk at most `cache_bytes`, in-flight downloads counted at the size their index
    records: a prefetch that does not fit waits until the shard is opened; shards nobody is reading go
    first, least recently used first. Only the shards open at once may take more."""

    def __init__(self, root: str | None, options: ReadOptions):
        self.options = options
        self.folder = tempfile.mkdtemp(prefix=f"shards-{os.getpid()}-", dir=root or options.cache_dir)
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.lock = threading.RLock()  # a reader's file may be closed by the garbage collector
        self.stop = threading.Event()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.count = 0
        # Daemon threads: a download still under way never keeps the process from ending.
        for _ in range(options.fetch_threads):
            threading.Thread(target=self._fetch_loop, name="kosmos-fetch", daemon=True).start()

    def on_disk(self) -> int:
        """Bytes the cache holds or has reserved."""
        with self.lock:
            return sum(entry.size for entry in self.entries.values())

    def _make_room(self, need: int, keep: str | None = None) -> bool:
        """Remove finished shards nobody reads until `need` more bytes fit; whether they do."""
        for location in list(self.entries):
            if self.on_disk() + need <= self.options.cache_bytes:
                break
            entry = self.entries.get(location)  # (a file closed by the collector may have run this)
            if entry is not None and location != keep and entry.readers == 0 and entry.future.done():
                del self.entries[location]
                with contextlib.suppress(OSError):
                    os.remove(entry.dest)
        return self.on_disk() + need <= self.options.cache_bytes

    def _add(self, location: str, expect: Version | None) -> _Entry:
        self.count += 1
        entry = _Entry(os.path.join(self.folder, f"{self.count:08d}"), expect.size if expect else None)
        self.entries[location] = entry
        return entry

    def _claim(self, entry: _Entry) -> bool:
        with self.lock:
            claimed, entry.claimed = entry.claimed, True
            return not claimed

    def prefetch(self, location: str, expect: Version | None = None) -> None:
        with self.lock:
            if location in self.entries:
                self.entries.move_to_end(location)
                return
            if not self._make_room(expect.size if expect and expect.size else 0):
                return
            entry = self._add(location, expect)
        self.queue.put((location, entry, expect))

    def _fetch_loop(self) -> None:
        while True:
            location, entry, expect = self.queue.get()
            if location is None or self.stop.is_set():
                return
            if self._claim(entry):
                self._fetch(location, entry, expect)

    def _fetch(self, location: str, entry: _Entry, expect: Version | None) -> None:
        try:
            version = download(location, entry.dest, self.options, expect, self.stop)
        except BaseException as error:  # noqa: BLE001 - handed to the reader
            with contextlib.suppress(OSError):
                os.remove(entry.dest)
            entry.future.set_exception(error)
            return
        with self.lock:
            entry.size = version.size or 0
        entry.future.set_result(version)

    def open(self, location: str, expect: Version | None = None) -> BinaryIO:
        with self.lock:
            entry = self.entries.get(location) or self._add(location, expect)
            self.entries.move_to_end(location)
            entry.readers += 1
        if self._claim(entry):
            self._fetch(location, entry, expect)
        try:
            entry.future.result()
            file = io.BufferedReader(_CachedFile(entry.dest, lambda: self._release(entry)))
        except Stopped:
            raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: the reader was closed") from None
        except ShardUnreadable:
            self._forget(location, entry)
            raise
        except OSError as error:
            self._forget(location, entry)
            raise ShardUnreadable(Reason.UNREADABLE_SHARD, f"{redact(location)}: {describe(error)}") from None
        with self.lock:
            self._make_room(0, keep=location)
        return file

    def _release(self, entry: _Entry) -> None:
        with self.lock:
            entry.readers -= 1
            self._make_room(0)

    def _forget(self, location: str, entry: _Entry) -> None:
        """A failed shard leaves the cache, so that a later reader tries it afresh."""
        with self.lock:
            entry.readers -= 1
            if self.entries.get(location) is entry:
                del self.entries[location]

    def close(self) -> None:
        self.stop.set()
        for _ in range(self.options.fetch_threads):
            self.queue.put((None, None, None))  # wake the fetch threads so that they end
        shutil.rmtree(self.folder, ignore_errors=True)
