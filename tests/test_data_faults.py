"""Remote corpora read through servers that misbehave the way real ones do (all on 127.0.0.1): storms
of 503, 429 and 500 answers, Retry-After, an outage, stalls after the headers, connections never
answered, a server that ignores Range, objects that change; indexing that meets them; and credentials
that must not be written or printed anywhere. Budgets and timeouts are set small to keep it fast."""

from __future__ import annotations

import contextlib
import hashlib
import html
import http.client
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import webdataset
from conftest import REPO, session_processes

from kosmos.config import ConfigError, from_dict
from kosmos.data import DataConfig, build_loader, sources
from kosmos.data.indexer import index_shards
from kosmos.data.shards import read_index

IMAGE_SIZE = 16
SLOTS = 4
SAMPLES = 6
FAST = sources.ReadOptions(retry_s=8.0, timeout_s=0.5)


class FaultHandler(BaseHTTPRequestHandler):
    """Serves the server's folder with byte ranges, ETags and directory listings; answers each path's
    scheduled faults first (`server.faults[path]`: a list taken from the front, one per request) and
    a persistent one after (`server.always[path]`). A fault is a status code, `stall` (headers, then
    nothing), `silent` (no answer at all) or `cut` (half the body, then the connection closes)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        server = self.server
        path = unquote(urlsplit(self.path).path)
        with server.lock:
            server.requests[path] += 1
            server.headers_seen.append(dict(self.headers))
            scheduled = server.faults.get(path)
            fault = scheduled.pop(0) if scheduled else server.always.get(path)
            if fault is None and time.monotonic() < server.outage_until:
                fault = 503
        if fault == "silent":
            server.stopping.wait()
            self.close_connection = True
            return
        if isinstance(fault, int):
            self.send_response(fault)
            if server.retry_after is not None:
                self.send_header("Retry-After", str(server.retry_after))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        target = Path(server.folder) / path.lstrip("/")
        if target.is_dir():
            links = "".join(f'<a href="{html.escape(p.name)}">{html.escape(p.name)}</a>\n' for p in sorted(target.iterdir()))
            self._send(200, links.encode(), {"Content-Type": "text/html"}, body)
            return
        if not target.is_file():
            self._send(404, b"", {}, body)
            return
        data = target.read_bytes()
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        status, headers, part = 200, {"ETag": etag, "Accept-Ranges": "bytes"}, data
        wanted = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if wanted.startswith("bytes=") and not server.ignore_range and (if_range in (None, etag)):
            start = int(wanted[6:].split("-")[0])
            status, part = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, part, headers, body, fault)

    def _send(self, status: int, data: bytes, headers: dict, body: bool, fault=None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        if fault == "stall":
            self.wfile.flush()
            self.server.stopping.wait()
            self.close_connection = True
            return
        if fault == "cut":
            data = data[: len(data) // 2]
            self.close_connection = True
        self.wfile.write(data)
        with self.server.lock:
            self.server.sent[unquote(urlsplit(self.path).path)] += len(data)
        if fault == "cut":
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            with self.server.lock:
                then = self.server.after_cut.pop(unquote(urlsplit(self.path).path), None)
            if then is not None:
                then()


@contextlib.contextmanager
def faulty_server(folder: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultHandler)
    server.daemon_threads = True
    server.folder = str(folder)
    server.lock = threading.Lock()
    server.faults, server.always = defaultdict(list), {}
    server.requests, server.sent = Counter(), Counter()
    server.headers_seen, server.after_cut = [], {}
    server.outage_until, server.retry_after, server.ignore_range = 0.0, None, False
    server.stopping = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()


def write_shards(folder: Path, count: int, samples: int = SAMPLES) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for number in range(count):
        name = f"{number:05d}.tar"
        with webdataset.TarWriter(str(folder / name), encoder=False, mtime=0) as tar:
            for i in range(samples):
                text = f"Shard {number} document {i} " + "words and more words " * 4
                tar.write({"__key__": f"{number:05d}{i:04d}", "txt": text.encode()})
        names.append(name)
    return names


@pytest.fixture
def corpus(tmp_path):
    """Eight text shards served over HTTP, indexed (with sizes and ETags) into a local folder."""
    names = write_shards(tmp_path / "bucket" / "text", 8)
    with faulty_server(tmp_path / "bucket") as (url, server):
        index_shards([f"{url}/text/"], tmp_path / "index", "text", FAST)
        server.requests.clear()
        server.sent.clear()
        yield tmp_path / "index", server, names


def text_config(path, **options) -> DataConfig:
    corpus = {"kind": "text", "path": str(path), "tokens_per_step": 128}
    raw = {
        "seq_len": 64,
        "micro_batch_size": 2,
        "num_workers": 0,
        "read_retry_s": 8,
        "read_timeout_s": 0.5,
        **options,
    }
    return from_dict(DataConfig, {**raw, "corpora": [corpus]}, "data")


def read_epoch(cfg: DataConfig, tokenizer, during=None) -> tuple[Counter, Counter]:
    """Samples of epoch 0 read and skips by reason; `during(step)` runs before each step."""
    loader = build_loader(cfg, tokenizer, IMAGE_SIZE, SLOTS)
    seen, skipped = Counter(), Counter()
    for step, _ in enumerate(loader):
        seen.update((r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
        skipped.update(why for r, why in loader.last_step_skipped if r.epoch == 0)
        if loader.epochs["text"] >= 1:
            return seen, skipped
        if during is not None:
            during(step)
        assert step < 200
    raise AssertionError("unreachable")


def every_sample(names: list[str]) -> set[tuple[str, int]]:
    return {(name, i) for name in names for i in range(SAMPLES)}


# -- the retry policy ---------------------------------------------------------------------------------


def test_transient_answers_are_retried_and_permanent_ones_are_not(tmp_path, capfd):
    write_shards(tmp_path, 1)
    whole = (tmp_path / "00000.tar").read_bytes()
    with faulty_server(tmp_path) as (url, server):
        server.faults["/00000.tar"] = [503, 429, 500, 502, "cut"]
        assert sources.read_bytes(f"{url}/00000.tar", FAST) == whole
        assert server.requests["/00000.tar"] == 6
        # The cut answer was resumed from where it broke off.
        assert any(h.get("Range", "").startswith("bytes=") for h in server.headers_seen)
        assert "HTTP 503" in capfd.readouterr().err
        for status in (401, 403, 404):
            server.faults["/00000.tar"] = [status]
            server.requests.clear()
            with pytest.raises(sources.ShardUnreadable, match=f"HTTP {status}") as raised:
                sources.read_bytes(f"{url}/00000.tar", FAST)
            assert server.requests["/00000.tar"] == 1 and raised.value.missing == (status == 404)
        # Retry-After is waited for; a wait longer than what is left of the budget gives up at once.
        server.retry_after = 1
        server.faults["/00000.tar"] = [503]
        started = time.monotonic()
        assert sources.read_bytes(f"{url}/00000.tar", FAST) == whole
        assert time.monotonic() - started >= 1
        server.retry_after = 60
        server.always["/00000.tar"] = 503
        with pytest.raises(sources.ShardUnreadable, match="still failing after 1 tries"):
            sources.read_bytes(f"{url}/00000.tar", FAST)


def test_storms_of_errors_lose_no_shard(corpus, tokenizer):
    folder, server, names = corpus
    for name, fault in zip(names, itertools.cycle([503, 429, 500])):
        server.faults[f"/text/{name}"] = [fault, "cut"]
    seen, skipped = read_epoch(text_config(folder), tokenizer)
    assert set(seen) == every_sample(names) and set(seen.values()) == {1} and not skipped


def test_an_outage_is_waited_out(corpus, tokenizer):
    folder, server, names = corpus

    def outage(step: int) -> None:
        if step == 2:  # every request answers 503 for 3 s, mid-epoch
            server.outage_until = time.monotonic() + 3

    seen, skipped = read_epoch(text_config(folder, read_retry_s=10), tokenizer, during=outage)
    assert set(seen) == every_sample(names) and not skipped
    assert server.outage_until > 0


def test_a_server_that_ignores_range_is_read_whole(corpus, tokenizer):
    folder, server, names = corpus
    server.ignore_range = True
    for name in names:
        server.faults[f"/text/{name}"] = ["cut"]
    seen, skipped = read_epoch(text_config(folder), tokenizer)
    assert set(seen) == every_sample(names) and not skipped


@pytest.mark.parametrize("fault", ["stall", "silent"])
def test_stalled_shards_do_not_starve_healthy_ones(tmp_path, tokenizer, fault):
    names = write_shards(tmp_path / "bucket" / "text", 12)
    stalled = names[1::2][:5]
    with faulty_server(tmp_path / "bucket") as (url, server):
        index_shards([f"{url}/text/"], tmp_path / "index", "text", FAST)
        for name in stalled:
            server.always[f"/text/{name}"] = fault
        cfg = text_config(tmp_path / "index", read_retry_s=1.5, read_timeout_s=0.3, max_skip_fraction=0.9)
        seen, skipped = read_epoch(cfg, tokenizer)
    assert set(seen) == every_sample([n for n in names if n not in stalled])
    assert skipped == {"unreadable_shard": SAMPLES * len(stalled)}


# -- changed objects ----------------------------------------------------------------------------------


def test_a_changed_shard_is_counted_never_mixed(corpus, tokenizer, tmp_path):
    folder, server, names = corpus
    bucket = Path(server.folder) / "text"
    # Rewritten after indexing, same size, new bytes: the ETag tells.
    with webdataset.TarWriter(str(bucket / names[3]), encoder=False, mtime=0) as tar:
        for i in range(SAMPLES):
            tar.write({"__key__": f"x{i:04d}", "txt": (f"Other version {i:03d} " + "w" * 90).encode()})
    seen, skipped = read_epoch(text_config(folder), tokenizer)
    assert set(seen) == every_sample([n for n in names if n != names[3]])
    assert skipped == {"shard_changed": SAMPLES}

    # An object replaced between two requests of one download comes whole, from one version.
    new = (bucket / names[1]).read_bytes()
    server.faults[f"/text/{names[0]}"] = ["cut"]
    server.after_cut[f"/text/{names[0]}"] = lambda: (bucket / names[0]).write_bytes(new)
    assert sources.read_bytes(f"http://127.0.0.1:{server.server_address[1]}/text/{names[0]}", FAST) == new


# -- indexing -----------------------------------------------------------------------------------------


def kosmos(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kosmos", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=120,
        check=False,
    )


def test_indexing_fails_loudly_and_writes_nothing(tmp_path):
    names = write_shards(tmp_path / "bucket" / "text", 3)
    (tmp_path / "bucket" / "text" / "junk.tar").write_bytes(b"not a tar file\n" * 40)
    with faulty_server(tmp_path / "bucket") as (url, server):
        server.always[f"/text/{names[1]}"] = 503
        with pytest.raises(ConfigError, match=rf"2 of 4 shards could not be counted.*{names[1]}.*HTTP 503"):
            index_shards([f"{url}/text/"], tmp_path / "out", "text", sources.ReadOptions(retry_s=1.5))
        assert not (tmp_path / "out" / "index.json").exists()
        done = kosmos("data", "index", f"{url}/text/nothing-here.tar", "--out", str(tmp_path / "gone"))
        assert done.returncode == 2 and "HTTP 404" in done.stderr and len(done.stderr.splitlines()) == 1
    done = kosmos("data", "index", str(tmp_path / "bucket" / "text" / "junk.tar"), "--out", str(tmp_path / "j"))
    assert done.returncode == 2 and "not a tar stream" in done.stderr, done.stderr
    assert not (tmp_path / "j" / "index.json").exists()
    done = kosmos("data", "index", "pipe:cat x.tar", "--out", str(tmp_path / "p"))
    assert done.returncode == 2 and "pipe: command" in done.stderr
    assert ".tgz" in kosmos("data", "index", "--help").stdout


def test_globs_over_http_and_s3_are_expanded(tmp_path):
    from kosmos.data.serve import serve_s3

    names = write_shards(tmp_path / "bucket" / "laion-wds", 3)
    write_shards(tmp_path / "bucket" / "other", 1)
    with faulty_server(tmp_path / "bucket") as (url, _):
        index, _ = index_shards([f"{url}/laion-wds/0000*.tar"], tmp_path / "http", "text", FAST)
        assert [(s.name, s.samples) for s in index.shards] == [(n, SAMPLES) for n in names]
        assert all(s.size == (tmp_path / "bucket" / "laion-wds" / s.name).stat().st_size for s in index.shards)
    with serve_s3(tmp_path / "bucket", bucket="globs") as s3:  # moto keeps buckets per process
        index, _ = index_shards([f"{s3}/laion-wds/000*.tar"], tmp_path / "s3", "text", FAST)
        assert [(s.name, s.samples) for s in index.shards] == [(n, SAMPLES) for n in names]
        assert all(s.etag for s in index.shards)


S3_ERRORS = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


class S3FaultProxy(BaseHTTPRequestHandler):
    """Relays requests to an S3 server (moto), first answering each object path's scheduled faults
    (`server.faults[path]`, taken from the front) and a persistent one (`server.always[path]`) with
    the error S3 gives for that status."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._relay()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD

    def _relay(self) -> None:
        server = self.server
        path = unquote(urlsplit(self.path).path)
        with server.lock:
            server.requests[path] += 1
            scheduled = server.faults.get(path)
            fault = scheduled.pop(0) if scheduled else server.always.get(path)
        sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if fault is not None:
            code = S3_ERRORS[fault]
            body = f"<Error><Code>{code}</Code><Message>{code} (planted)</Message></Error>".encode()
            self._answer(fault, {"Content-Type": "application/xml"}, body)
            return
        upstream = http.client.HTTPConnection(server.upstream, timeout=30)
        upstream.request(self.command, self.path, sent, {k: v for k, v in self.headers.items()})
        answer = upstream.getresponse()
        body = answer.read()
        headers = {k: v for k, v in answer.getheaders() if k.lower() not in ("transfer-encoding", "connection")}
        upstream.close()
        self._answer(answer.status, headers, body)

    def _answer(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        if self.command != "HEAD":
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@contextlib.contextmanager
def s3_behind_faults(folder: Path, bucket: str):
    """`folder` in a moto S3 bucket reached through `S3FaultProxy`, botocore's own retries off (so the
    loader's policy answers every fault); yields the bucket's URL and the proxy."""
    from s3fs import S3FileSystem

    from kosmos.data.serve import serve_s3

    with serve_s3(folder, bucket=bucket) as s3:
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), S3FaultProxy)
        proxy.daemon_threads = True
        proxy.upstream = urlsplit(os.environ["AWS_ENDPOINT_URL"]).netloc
        proxy.lock, proxy.requests = threading.Lock(), Counter()
        proxy.faults, proxy.always = defaultdict(list), {}
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}", "AWS_MAX_ATTEMPTS": "1"}
        saved = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        S3FileSystem.clear_instance_cache()
        try:
            yield s3, proxy
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            S3FileSystem.clear_instance_cache()
            proxy.shutdown()
            proxy.server_close()


def test_s3_throttling_and_5xx_are_retried_and_403_and_missing_keys_counted(tmp_path, tokenizer, capfd):
    from s3fs import S3FileSystem

    names = write_shards(tmp_path / "bucket" / "text", 6)
    with s3_behind_faults(tmp_path / "bucket", "faults") as (s3, proxy):
        index_shards([f"{s3}/text/"], tmp_path / "index", "text", FAST)
        S3FileSystem().rm(f"faults/text/{names[5]}")
        proxy.requests.clear()
        key = [f"/faults/text/{name}" for name in names]
        proxy.faults[key[0]] = [503, 503, 503]
        proxy.faults[key[1]] = [500, 500]
        proxy.faults[key[2]] = [503, 500]
        proxy.always[key[4]] = 403
        seen, skipped = read_epoch(text_config(tmp_path / "index", max_skip_fraction=0.9), tokenizer)
        requests = dict(proxy.requests)
    assert set(seen) == every_sample(names[:4]) and set(seen.values()) == {1}
    assert skipped == {"unreadable_shard": 2 * SAMPLES}
    assert requests[key[0]] > 3 and requests[key[1]] > 2 and requests[key[2]] > 2  # past their faults
    err = capfd.readouterr().err
    assert "HTTP 500" in err
    # One request each time the shard is opened (once an epoch; the reading ran into epoch 1): no retry.
    for name, why in ((names[4], "HTTP 403"), (names[5], "HTTP 404")):
        opened = [line for line in err.splitlines() if f"shard {name} skipped" in line]
        assert opened and all(why in line for line in opened) and requests[key[names.index(name)]] == len(opened)


# -- names and credentials ----------------------------------------------------------------------------


def test_no_secret_in_the_index_or_any_message(tmp_path, tokenizer, capfd):
    write_shards(tmp_path / "bucket" / "text", 2)
    with faulty_server(tmp_path / "bucket") as (url, server):
        secret_url = url.replace("http://", "http://reader:hunter2@") + "/text/"
        index_shards([secret_url], tmp_path / "index", "text", FAST)
        assert any(h.get("Authorization") for h in server.headers_seen)  # the user info was used
        server.always["/text/00001.tar"] = 500
        (tmp_path / "bucket" / "bad").mkdir()
        (tmp_path / "bucket" / "bad" / "index.json").write_text("{not json")
        messages = []
        # An index that is not there (named with a token), one that is not JSON, a shard failing.
        for path in (f"{url}/nothing?token=hunter3", secret_url.replace("/text/", "/bad")):
            with pytest.raises(ConfigError) as raised:
                build_loader(text_config(path, read_retry_s=1), tokenizer, IMAGE_SIZE, SLOTS)
            messages.append(str(raised.value))
        assert "not a corpus index" in messages[1]
        signed = f"{secret_url}00001.tar?token=hunter3"
        done = kosmos("data", "index", signed, "--out", str(tmp_path / "x"), "--read-retry-s", "1")
        assert done.returncode == 2
        messages.append(done.stderr)
        _, skipped = read_epoch(text_config(tmp_path / "index", read_retry_s=1), tokenizer)
        assert skipped == {"unreadable_shard": SAMPLES}
    written = (tmp_path / "index" / "index.json").read_text()
    everything = written + "".join(messages) + "".join(capfd.readouterr())
    assert "hunter2" not in everything and "hunter3" not in everything and "reader" not in everything


def test_names_outside_a_remote_base_and_odd_names(tmp_path, tokenizer):
    names = write_shards(tmp_path / "bucket" / "text", 2)
    secret = tmp_path / "secret.tar"
    secret.write_bytes((tmp_path / "bucket" / "text" / names[0]).read_bytes())
    index = json.loads(json.dumps({"version": 1, "kind": "text", "skipped": {}}))
    index["shards"] = [
        {"name": names[0], "samples": SAMPLES},
        {"name": f"file://{secret}", "samples": SAMPLES},
        {"name": "bad\u0000name.tar", "samples": SAMPLES},
    ]
    (tmp_path / "bucket" / "text" / "index.json").write_text(json.dumps(index))
    with faulty_server(tmp_path / "bucket") as (url, _):
        seen, skipped = read_epoch(text_config(f"{url}/text", max_skip_fraction=0.9), tokenizer)
    assert set(seen) == every_sample(names[:1]) and skipped == {"path_outside": 2 * SAMPLES}

    index["base"] = "pipe:cat"
    (tmp_path / "bucket" / "text" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="base pipe:cat ... is a pipe: command"):
        read_index(tmp_path / "bucket" / "text")
    with pytest.raises(ConfigError, match=r"data.corpora\[0\].path: pipe:cat ... is a pipe: command"):
        build_loader(text_config("pipe:cat x"), tokenizer, IMAGE_SIZE, SLOTS)


# -- the cache and the fetch threads -------------------------------------------------------------------


def test_the_cache_holds_its_bound_and_a_pending_download_does_not_hold_the_process(corpus, tmp_path):
    folder, server, names = corpus
    index = read_index(folder)
    size = index.shards[0].size
    cache = sources.ShardCache(str(tmp_path), sources.ReadOptions(cache_bytes=int(2.5 * size), timeout_s=0.5))
    server.always[f"/text/{names[0]}"] = 503  # a failed download leaves nothing behind
    try:
        for shard in index.shards:
            cache.prefetch(index.location(shard.name), shard.version)
        for shard in index.shards[1:]:
            with cache.open(index.location(shard.name), shard.version) as file:
                assert file.read() == (Path(server.folder) / "text" / shard.name).read_bytes()
                on_disk = sum(p.stat().st_size for p in Path(cache.folder).iterdir())
                assert on_disk <= cache.options.cache_bytes and cache.on_disk() <= cache.options.cache_bytes
    finally:
        cache.close()
    assert not Path(cache.folder).exists()

    # A process whose cache has a download that never gets an answer still ends at once.
    script = (
        "import sys; from kosmos.data import sources\n"
        "cache = sources.ShardCache(None, sources.ReadOptions(timeout_s=600))\n"
        "cache.prefetch(sys.argv[1])\n"
        "print('done', flush=True)\n"
    )
    server.always[f"/text/{names[1]}"] = "silent"
    url = f"http://127.0.0.1:{server.server_address[1]}/text/{names[1]}"
    done = subprocess.run(
        [sys.executable, "-c", script, url], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout == "done\n"


def test_an_index_that_answers_503_or_nothing_at_the_start(tmp_path, tokenizer):
    write_shards(tmp_path / "text", 2)
    index_shards([str(tmp_path / "text")], tmp_path / "text", "text")
    with faulty_server(tmp_path) as (url, server):
        server.faults["/text/index.json"] = [503, 503]
        build_loader(text_config(f"{url}/text"), tokenizer, IMAGE_SIZE, SLOTS)
        assert server.requests["/text/index.json"] == 3
        server.always["/text/index.json"] = "silent"
        with pytest.raises(ConfigError, match=r"index.json: cannot be read \(.*timed out"):
            build_loader(text_config(f"{url}/text", read_retry_s=1, read_timeout_s=0.3), tokenizer, 16, 4)


def test_a_store_this_installation_cannot_read_is_a_config_error(tmp_path):
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        done = kosmos("data", "index", "gs://bucket/laion/", "--out", str(tmp_path / "gs"))
        assert done.returncode == 2 and "SRC: gs://bucket/laion/: cannot read gs://" in done.stderr
        assert "Traceback" not in done.stderr
    else:
        pytest.skip("gcsfs is installed")


# -- training that ends with downloads pending ---------------------------------------------------------


@pytest.mark.slow  # a training process
@pytest.mark.parametrize("workers", [0, 1])
def test_training_ends_on_time_with_stalled_downloads_pending(tmp_path, tokenizer, workers):
    """Two lanes, each reading its first shard while the shard after it is prefetched: one of those
    stalls after its headers, the other is never answered. Each stalled download would hold a fetch
    thread for `read_timeout_s` (and retry for `read_retry_s`); the run must end long before."""
    from kosmos.data.stream import EpochPlan

    stall_s = 120.0
    samples = 60
    names = write_shards(tmp_path / "bucket" / "text", 4, samples)
    with faulty_server(tmp_path / "bucket") as (url, server):
        index, _ = index_shards([f"{url}/text/"], tmp_path / "index", "text", FAST)
        # The window of 64 samples (32 per lane) lies in each lane's first shard, more than 3 steps need.
        plan = EpochPlan(index, 0, "text", 0, 0, 1, 2, 64)
        first = [index.shards[k].name for k in plan.shards[0::2]]
        for name, fault in zip([index.shards[k].name for k in plan.shards[1::2]], ["stall", "silent"]):
            server.always[f"/text/{name}"] = fault
        server.requests.clear()
        server.sent.clear()
        recipe = tmp_path / "train.yaml"
        recipe.write_text(
            json.dumps(
                {
                    "model": str(REPO / "configs/model/tiny.yaml"),
                    "tokenizer": str(tokenizer.model_file),
                    "data": {
                        "seq_len": 64,
                        "micro_batch_size": 2,
                        "num_workers": workers,
                        "shuffle_spans": 2,
                        "shuffle_window": 64,
                        "read_timeout_s": stall_s,
                        "read_retry_s": stall_s,
                        "corpora": [{"kind": "text", "path": str(tmp_path / "index"), "tokens_per_step": 128}],
                    },
                    "train": {"max_steps": 3, "log_interval": 1},
                    "checkpoint": {"interval": 3, "keep": 1},
                    "logging": {"tensorboard": False, "progress_bar": False},
                }
            )
        )
        run_dir = tmp_path / "run"
        command = [sys.executable, "-m", "kosmos", "train", "--config", str(recipe), "--run-dir", str(run_dir)]
        command += ["model.text.layers=2", f"model.text.vocab_size={tokenizer.vocab_size}"]
        with open(tmp_path / "out.txt", "w") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                start_new_session=True,
            )
        try:
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.is_file() and 3 in [json.loads(line)["step"] for line in metrics.open()]):
                assert process.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
                time.sleep(0.1)
            last_step = time.monotonic()
            process.wait(timeout=stall_s)  # a run held by its pending downloads fails here
            ended = time.monotonic() - last_step
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
        output = (tmp_path / "out.txt").read_text()
        assert process.returncode == 0, output[-3000:]
        assert ended < stall_s / 4, output[-3000:]
        assert "done: 3 steps" in output and "Traceback" not in output
        # The stalled downloads were under way; the healthy shards were read whole.
        assert all(server.requests[f"/text/{name}"] for name in names)
        for name in first:
            assert server.sent[f"/text/{name}"] == (tmp_path / "bucket" / "text" / name).stat().st_size
    time.sleep(0.5)
    assert session_processes(process.pid) == []  # no loader worker outlives the run
