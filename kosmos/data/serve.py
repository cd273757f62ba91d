"""Local stand-ins for remote storage, on 127.0.0.1: an HTTP server with byte ranges, and an S3 server
(moto). `kosmos bench data --serve` measures the loader through them; the tests read corpora through
them. Nothing here is used in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kosmos.config import ConfigError
from kosmos.data.config import DataConfig


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a folder, honouring `Range: bytes=a-b` (remote readers fetch files in ranges). A path
    in the server's `cut_once` gets its next response cut off half way, as a dropped connection; one
    in `stall` gets no answer until the server stops."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        pass

    def send_head(self):
        if self.path in self.server.stall:
            self.server.stopping.wait()
            return None
        path = self.translate_path(self.path)
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if wanted is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = wanted.groups()
        start = int(first) if first else max(0, size - int(last or 0))
        end = min(int(last), size - 1) if first and last else size - 1
        if start >= size:
            self.send_error(416, "range not satisfiable")
            return None
        file = open(path, "rb")  # noqa: SIM115 - closed by the base class after copyfile
        file.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._left = end - start + 1
        return file

    def end_headers(self) -> None:
        if not hasattr(self, "_left"):
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def copyfile(self, source, outputfile) -> None:
        left = getattr(self, "_left", None)
        if left is None:  # the whole file, or a directory listing
            here = source.tell()
            left = source.seek(0, os.SEEK_END) - here
            source.seek(here)
        if self.path in self.server.cut_once:
            self.server.cut_once.discard(self.path)
            left //= 2
            self.close_connection = True
        while left > 0:
            chunk = source.read(min(1 << 16, left))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)
        if self.close_connection:
            with contextlib.suppress(OSError):
                outputfile.flush()
                self.connection.shutdown(2)
        vars(self).pop("_left", None)


@contextlib.contextmanager
def serve_http(folder: str | Path) -> Iterator[tuple[str, ThreadingHTTPServer]]:
    """`folder` at http://127.0.0.1:PORT: the base URL and the server, whose sets of URL paths
    `cut_once` (the next response breaks off half way) and `stall` (no answer) stage faults."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(folder)))
    server.daemon_threads = True
    server.cut_once, server.stall, server.stopping = set(), set(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_s3(folder: str | Path, bucket: str = "corpora") -> Iterator[str]:
    """`folder`'s files uploaded to a local moto S3 server, whose endpoint and (dummy) credentials are
    set in the environment for the duration; yields `s3://BUCKET`."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ConfigError("--serve s3: needs moto's server (pip install 'moto[server]')") from None
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    S3FileSystem.clear_instance_cache()
    try:
        fs = S3FileSystem()
        fs.mkdir(bucket)
        fs.put(str(folder).rstrip("/") + "/", f"{bucket}/", recursive=True)
        yield f"s3://{bucket}"
    finally:
        S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@contextlib.contextmanager
def serve_corpora(cfg: DataConfig, how: str | None) -> Iterator[DataConfig]:
    """`cfg` with its local corpora served from 127.0.0.1 over `how` (`http` or `s3`); None: as it is."""
    if how is None:
        yield cfg
        return
    folders = [os.path.abspath(corpus.path) for corpus in cfg.corpora]
    root = os.path.commonpath([os.path.dirname(folder) for folder in folders])
    with serve_http(root) if how == "http" else serve_s3(root) as served:
        base = served[0] if how == "http" else served
        corpora = [
            dataclasses.replace(corpus, path=f"{base}/{os.path.relpath(folder, root)}")
            for corpus, folder in zip(cfg.corpora, folders)
        ]
        yield dataclasses.replace(cfg, corpora=corpora)
