"""Corpora read where they lie: local disk, HTTP with byte ranges and S3 (both local servers on
127.0.0.1), img2dataset-style shards indexed in place (stats files, one wrong count, a .tar.gz),
the same samples from every source, exact resume, dropped connections and shards that cannot be read."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset
import yaml
from PIL import Image

from kosmos.config import ConfigError, from_dict
from kosmos.data import DataConfig, DataError, build_loader
from kosmos.data.batch import Batch
from kosmos.data.indexer import index_shards
from kosmos.data.inspection import inspect
from kosmos.data.serve import serve_http, serve_s3
from kosmos.data.shards import CorpusIndex, ShardInfo, read_index, write_index

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
SLOTS = 4
# (samples held, samples its stats file claims; None: no stats file), per shard
SHARDS = {"00000.tar": (9, 9), "00001.tar": (7, 9), "00002.tar": (11, 8), "00003.tar": (6, None)}
GZ_SAMPLES = 5


def jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (shade, 255 - shade, 40)).save(out, "JPEG")
    return out.getvalue()


def img2dataset_sample(shard: int, i: int) -> dict[str, bytes]:
    key = f"{shard:05d}{i:04d}"
    meta = {"key": key, "caption": f"picture {shard} {i}", "status": "success"}
    return {
        "__key__": key,
        "jpg": jpeg(20 * i % 250),
        "txt": meta["caption"].encode(),
        "json": json.dumps(meta).encode(),
    }


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """img2dataset-style output (tars, *_stats.json, parquet) and, beside it, a .tar.gz of the same layout."""
    root = tmp_path_factory.mktemp("bucket")
    laion = root / "laion"
    laion.mkdir()
    for number, (name, (held, claimed)) in enumerate(SHARDS.items()):
        with webdataset.TarWriter(str(laion / name), encoder=False, mtime=0) as tar:
            for i in range(held):
                tar.write(img2dataset_sample(number, i))
        if claimed is not None:
            stats = {"count": claimed + 2, "successes": claimed, "failed_to_download": 2}
            (laion / f"{name[:-4]}_stats.json").write_text(json.dumps(stats))
        (laion / f"{name[:-4]}.parquet").write_bytes(b"PAR1")
    packed = root / "packed"
    packed.mkdir()
    with webdataset.TarWriter(str(packed / "00009.tar.gz"), encoder=False, mtime=0) as tar:
        for i in range(GZ_SAMPLES):
            tar.write(img2dataset_sample(9, i))
    index_shards([str(laion)], laion, "caption")
    return root


def data_config(path: str, tokens: int = 128, **options) -> DataConfig:
    corpus = {"kind": "caption", "path": path, "tokens_per_step": tokens}
    raw = {"seq_len": 64, "micro_batch_size": 2, "num_workers": 0, "shuffle_window": 8, **options}
    return from_dict(DataConfig, {**raw, "corpora": [corpus]}, "data")


def loader_for(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1):
    return build_loader(cfg, tokenizer, IMAGE_SIZE, SLOTS, rank=rank, world_size=world_size)


def epoch_of(cfg: DataConfig, tokenizer, world_size: int) -> tuple[Counter, Counter]:
    """Over ranks 0..world_size-1 (in process), the samples begun in epoch 0 and the skips by reason."""
    seen, skipped = Counter(), Counter()
    for rank in range(world_size):
        loader = loader_for(cfg, tokenizer, rank, world_size)
        for step in itertools.count():
            next(iter_of(loader))
            seen.update((r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
            skipped.update(why for r, why in loader.last_step_skipped if r.epoch == 0)
            if loader.epochs["caption"] >= 1:
                break
            assert step < 200
    return seen, skipped


def iter_of(loader):
    if not hasattr(loader, "_test_iter"):
        loader._test_iter = iter(loader)
    return loader._test_iter


def expected_samples() -> set[tuple[str, int]]:
    """What an epoch reads: every sample a shard holds, up to its claimed count."""
    return {(name, i) for name, (held, claimed) in SHARDS.items() for i in range(min(held, claimed or held))}


def steps(loader, n: int) -> list[tuple[list[Batch], list]]:
    out = []
    for batches in itertools.islice(loader, n):
        out.append((batches, list(loader.last_step_samples)))
    return out


def same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (want, want_refs), (got, got_refs) in zip(a, b):
        assert want_refs == got_refs
        for x, y in zip(want, got, strict=True):
            assert x.corpora == y.corpora
            for key, tensor in x.inputs().items():
                assert torch.equal(tensor, getattr(y, key)), key


def test_messages_show_no_credentials():
    from kosmos.data import sources

    assert sources.redact("https://user:secret@host:8080/laion/x.tar?X-Amz-Signature=abc") == (
        "https://host:8080/laion/x.tar"
    )
    error = sources.ShardUnreadable("unreadable_shard", "GET 'https://a:b@h/x.tar?sig=1' failed: 500")
    assert "sig=1" not in str(error) and "a:b" not in str(error) and "https://h/x.tar" in str(error)


def test_index_reads_stats_files_or_counts_tar_headers(bucket, tmp_path):
    index = read_index(bucket / "laion")
    assert {s.name: s.samples for s in index.shards} == {
        name: claimed if claimed is not None else held for name, (held, claimed) in SHARDS.items()
    }
    # An index written elsewhere points at the shards where they lie.
    index_shards([str(bucket / "packed" / "*.tar.gz")], tmp_path / "packed", "caption")
    packed = read_index(tmp_path / "packed")
    assert packed.base == str(bucket / "packed")
    assert [(s.name, s.samples) for s in packed.shards] == [("00009.tar.gz", GZ_SAMPLES)]
    with pytest.raises(ConfigError, match="already has an index"):
        index_shards([str(bucket / "packed")], tmp_path / "packed", "caption")


def test_same_samples_from_disk_http_and_s3_each_once_per_epoch(bucket, tokenizer, tmp_path):
    local = str(bucket / "laion")
    straight = steps(loader_for(data_config(local), tokenizer), 6)
    with serve_http(bucket) as (url, _), serve_s3(bucket) as s3:
        # The index written from the HTTP listing matches the local one.
        index_shards([f"{url}/laion/"], tmp_path / "from-http", "caption")
        assert read_index(tmp_path / "from-http").shards == read_index(local).shards
        for path in (local, f"{url}/laion", f"{s3}/laion"):
            same_batches(straight, steps(loader_for(data_config(path), tokenizer), 6))
            for world_size in (1, 2, 3, 4):
                seen, skipped = epoch_of(data_config(path, tokens=128 * world_size), tokenizer, world_size)
                assert set(seen) == expected_samples() and set(seen.values()) == {1}, (path, world_size)
                # The shard that holds fewer samples than its count, and the one that holds more.
                assert skipped == {"shard_shorter_than_index": 2, "shard_longer_than_index": 3}


def test_resume_at_random_steps_from_http_gives_the_same_batches(bucket, tokenizer):
    with serve_http(bucket) as (url, _):
        cfg = data_config(f"{url}/laion", shuffle_window=5, shuffle_spans=3)
        straight = steps(loader_for(cfg, tokenizer), 14)
        for stop in random.Random(0).sample(range(1, 13), 3):
            first = loader_for(cfg, tokenizer)
            steps(first, stop)
            resumed = loader_for(cfg, tokenizer)
            resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
            same_batches(straight[stop:], steps(resumed, 14 - stop))


def test_dropped_connection_is_retried_and_tar_gz_is_read(bucket, tokenizer, tmp_path, capfd):
    with serve_http(bucket) as (url, server):
        cfg = data_config(f"{url}/laion")
        straight = steps(loader_for(cfg, tokenizer), 8)
        server.cut_once.update(f"/laion/{name}" for name in SHARDS)
        same_batches(straight, steps(loader_for(cfg, tokenizer), 8))
        assert "retrying" in capfd.readouterr().err
        index_shards([f"{url}/packed/"], tmp_path / "gz", "caption")
        seen, skipped = epoch_of(data_config(str(tmp_path / "gz")), tokenizer, world_size=1)
    assert set(seen) == {("00009.tar.gz", i) for i in range(GZ_SAMPLES)} and not skipped


def test_a_stalled_shard_times_out_and_the_run_goes_on(bucket, tokenizer):
    with serve_http(bucket) as (url, server):
        server.stall.add("/laion/00003.tar")
        cfg = data_config(f"{url}/laion", read_timeout_s=0.5, read_retry_s=1.5)
        seen, skipped = epoch_of(cfg, tokenizer, world_size=1)
    assert {name for name, _ in seen} == {"00000.tar", "00001.tar", "00002.tar"}
    assert skipped["unreadable_shard"] == SHARDS["00003.tar"][0]


def test_malformed_tar_headers_are_counted(tmp_path, tokenizer):
    folder = tmp_path / "text"
    write_text_corpus(folder, ["a.tar", "b.tar"])
    with tarfile.open(folder / "b.tar") as tar:
        second = tar.getmembers()[1].offset
    raw = bytearray((folder / "b.tar").read_bytes())
    raw[second + 124 : second + 136] = b"not octal!!\0"  # the size field of the second sample's header
    (folder / "b.tar").write_bytes(bytes(raw))
    header = tarfile.TarInfo("x-0.txt").tobuf(tarfile.USTAR_FORMAT)
    pax = bytearray(header)
    pax[156:157] = b"x"  # a pax extended header whose records are garbage
    pax[124:136] = b"%011o\0" % 512
    pax[148:156] = b"        "
    pax[148:155] = b"%06o\0" % sum(pax[:512])
    (folder / "c.tar").write_bytes(bytes(pax) + b"99999 path=\xff\xfe" + bytes(512 - 16) + bytes(1024))
    write_index(folder, CorpusIndex("text", [ShardInfo(n, 6) for n in ("a.tar", "b.tar", "c.tar")]))
    loader = loader_for(text_config(folder), tokenizer)
    seen, skipped = set(), {}
    for _ in run_until_epoch(loader):
        seen.update((r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
        skipped.update({(r.shard, r.index): why for r, why in loader.last_step_skipped if r.epoch == 0})
    # Every counted sample arrived or was skipped with a reason; the damage is counted as such.
    assert seen | set(skipped) == {(name, i) for name in ("a.tar", "b.tar", "c.tar") for i in range(6)}
    assert {(name, i) for name, i in seen if name == "a.tar"} == {("a.tar", i) for i in range(6)}
    assert skipped[("b.tar", 5)] == "truncated_shard" and skipped[("c.tar", 0)] == "unreadable_shard"


def run_until_epoch(loader, max_steps: int = 200):
    for step, batches in enumerate(loader):
        yield batches
        if min(loader.epochs.values()) >= 1:
            return
        assert step < max_steps


def test_tar_zst_shards_are_read(bucket, tokenizer, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    folder = tmp_path / "zst"
    folder.mkdir()
    plain = io.BytesIO()
    with webdataset.TarWriter(plain, encoder=False, mtime=0) as tar:
        for i in range(GZ_SAMPLES):
            tar.write(img2dataset_sample(7, i))
    (folder / "00007.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.getvalue()))
    index_shards([str(folder)], folder, "caption")
    seen, skipped = epoch_of(data_config(str(folder)), tokenizer, world_size=1)
    assert set(seen) == {("00007.tar.zst", i) for i in range(GZ_SAMPLES)} and not skipped


def write_text_corpus(folder: Path, names: list[str], samples: int = 6) -> None:
    folder.mkdir(parents=True)
    for name in names:
        if name.endswith(".tar"):
            with webdataset.TarWriter(str(folder / name), encoder=False, mtime=0) as tar:
                for i in range(samples):
                    text = f"Shard {name} document {i} " + "words and more words " * 4
                    tar.write({"__key__": f"{Path(name).stem}-{i}", "txt": text.encode()})
    write_index(folder, CorpusIndex("text", [ShardInfo(name, samples) for name in names]))


def text_config(folder: Path, world_size: int = 1, **options) -> DataConfig:
    corpus = {"kind": "text", "path": str(folder), "tokens_per_step": 128 * world_size}
    raw = {"seq_len": 64, "micro_batch_size": 2, "num_workers": 0, "read_retry_s": 0, **options}
    return from_dict(DataConfig, {**raw, "corpora": [corpus]}, "data")


def test_bad_shards_are_counted_and_training_goes_on(tmp_path, tokenizer):
    folder = tmp_path / "text"
    write_text_corpus(folder, ["a.tar", "b.tar", "c.tar"])
    os.mkfifo(folder / "fifo.tar")  # would block a reader that opened it
    (tmp_path / "outside.tar").write_bytes((folder / "a.tar").read_bytes())
    index = read_index(folder)
    index.shards += [ShardInfo("fifo.tar", 6), ShardInfo("../outside.tar", 6), ShardInfo("gone.tar", 6)]
    write_index(folder, CorpusIndex("text", index.shards))
    bad = {"fifo.tar": "unreadable_shard", "../outside.tar": "path_outside", "gone.tar": "unreadable_shard"}
    for world_size in (1, 4):
        seen, skipped = set(), set()
        for rank in range(world_size):
            loader = loader_for(text_config(folder, world_size), tokenizer, rank, world_size)
            for _ in itertools.islice(loader, 40):  # several epochs
                seen.update((r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
                skipped.update((r.shard, r.index, why) for r, why in loader.last_step_skipped if r.epoch == 0)
            assert loader.epochs["text"] >= 2
        assert seen == {(name, i) for name in ("a.tar", "b.tar", "c.tar") for i in range(6)}
        assert skipped == {(name, i, why) for name, why in bad.items() for i in range(6)}


def test_one_unreadable_shard_of_four_does_not_stop_training(tmp_path, tokenizer):
    folder = tmp_path / "text"
    write_text_corpus(folder, ["a.tar", "b.tar", "c.tar", "d.tar"])
    (folder / "c.tar").write_bytes(b"not a tar file\n" * 40)
    for rank in range(4):  # 2 ranks x 2 workers, as four streams
        loader = loader_for(text_config(folder, world_size=4), tokenizer, rank, world_size=4)
        for _ in itertools.islice(loader, 150):
            pass
        assert loader.epochs["text"] >= 10 and loader.skipped["unreadable_shard"] > 0


def test_a_corpus_that_cannot_feed_its_share_stops_with_the_shards_and_reasons(tmp_path, tokenizer):
    folder = tmp_path / "text"
    write_text_corpus(folder, ["a.tar", "b.tar"])
    for name in ("a.tar", "b.tar"):
        (folder / name).write_bytes(b"not a tar file\n" * 40)
    with pytest.raises(DataError, match=r"corpus text .* can no longer feed .*unreadable_shard.*a\.tar"):
        next(iter(loader_for(text_config(folder), tokenizer)))

    write_text_corpus(tmp_path / "mostly", ["a.tar", "b.tar", "c.tar", "d.tar"], samples=300)
    for name in ("b.tar", "c.tar", "d.tar"):
        (tmp_path / "mostly" / name).unlink()
    with pytest.raises(DataError, match="over data.max_skip_fraction 0.5"):
        for _ in loader_for(text_config(tmp_path / "mostly"), tokenizer):
            pass


def test_pipe_shards_run_only_when_allowed(tmp_path, tokenizer):
    folder = tmp_path / "text"
    write_text_corpus(folder, ["a.tar"])
    write_index(folder, CorpusIndex("text", [ShardInfo(f"pipe:cat {folder / 'a.tar'}", 6)]))
    with pytest.raises(ConfigError, match="data.allow_pipe: .* pipe: commands"):
        loader_for(text_config(folder), tokenizer)
    loader = loader_for(text_config(folder, allow_pipe=True), tokenizer)
    next(iter(loader))
    assert loader.last_step_samples and not loader.skipped


@pytest.mark.slow  # a training process
def test_train_from_an_http_corpus(tmp_path):
    from kosmos.data.sample import build_sample

    sample = tmp_path / "sample"
    build_sample(sample)
    with serve_http(tmp_path) as (url, _):
        secret = url.replace("http://", "http://reader:hunter2@")  # never written, never printed
        corpora = [
            {"kind": kind, "path": f"{secret}/sample/{kind}", "tokens_per_step": tokens}
            for kind, tokens in (("text", 256), ("caption", 512), ("interleaved", 256))
        ]
        recipe = tmp_path / "train.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "model": str(REPO / "configs/model/tiny.yaml"),
                    "tokenizer": str(sample / "tokenizer.model"),
                    "data": {"seq_len": 128, "micro_batch_size": 2, "num_workers": 1, "corpora": corpora},
                    "train": {"max_steps": 4, "log_interval": 1, "seed": 7},
                    "checkpoint": {"interval": 4, "keep": 1},
                    "logging": {"tensorboard": False, "progress_bar": False},
                }
            )
        )
        run_dir = tmp_path / "run"
        command = [
            sys.executable,
            "-m",
            "kosmos",
            "train",
            "--config",
            str(recipe),
            "--run-dir",
            str(run_dir),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        done = subprocess.run(
            [*command, "model.text.layers=2"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged[-1] == 4
    for path in [p for p in run_dir.rglob("*") if p.is_file()]:
        assert b"hunter2" not in path.read_bytes(), path
    assert "hunter2" not in done.stdout + done.stderr


def test_a_resume_that_changes_the_epoch_order_is_refused(tmp_path, tokenizer):
    folder = tmp_path / "text"
    write_text_corpus(folder, ["a.tar", "b.tar"])
    loader = loader_for(text_config(folder), tokenizer)
    steps(loader, 2)
    state = loader.state_dict()
    for key, value in (("shuffle_window", 7), ("shuffle_spans", 3)):
        with pytest.raises(ConfigError, match=rf"data.{key}: the loader state was saved with \d+, not {value}"):
            loader_for(text_config(folder, **{key: value}), tokenizer).load_state_dict(state)
    loader_for(text_config(folder), tokenizer).load_state_dict(state)


def tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with webdataset.TarWriter(out, encoder=False, mtime=0) as tar:
        for i, sample in enumerate(samples):
            tar.write({"__key__": f"{i:04d}", **sample})
    return out.getvalue()


def pair(i: int) -> dict[str, bytes]:
    return {"jpg": jpeg(6 * i % 250), "txt": f"picture {i}".encode()}


def small_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "PNG")
    return out.getvalue()


def cut(data: bytes) -> bytes:
    """A shard cut short halfway, as an interrupted copy leaves it."""
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def planted_corpus(tmp_path_factory) -> Path:
    """A caption corpus of plain, gzip and zstandard shards with bad samples and bad shards planted in
    it, by the counts its index claims; every reason a sample or shard can be lost under appears."""
    zstandard = pytest.importorskip("zstandard")
    import gzip

    root = tmp_path_factory.mktemp("planted") / "corpus"
    root.mkdir()
    shards = {  # name: (bytes, samples the index claims)
        "a.tar": (
            tar_bytes(
                [pair(0), pair(1), {"jpg": b"not an image", "txt": b"x"}, {"jpg": jpeg(5)}, {"txt": b"alone"}]
            ),
            5,
        ),
        "b.tar.gz": (
            gzip.compress(tar_bytes([pair(2), {"png": small_png(), "txt": b"tiny"}, pair(3)]), mtime=0),
            3,
        ),
        "c.tar.zst": (
            zstandard.ZstdCompressor().compress(tar_bytes([pair(4), {"jpg": jpeg(6)[:300], "txt": b"cut"}])),
            2,
        ),
        "d.tgz": (cut(gzip.compress(tar_bytes([pair(i) for i in range(5, 35)]), mtime=0)), 30),
        "e.tar": (tar_bytes([pair(i) for i in range(35, 41)]), 4),  # holds 2 more than its count
        "f.tar.gz": (gzip.compress(tar_bytes([pair(41), pair(42)]), mtime=0), 4),  # 2 fewer
        "g.tar": (b"not a tar file\n" * 80, 3),
        "h.tar.zst": (b"", 2),  # listed, never written
    }
    for name, (data, _) in shards.items():
        if data:
            (root / name).write_bytes(data)
    write_index(root, CorpusIndex("caption", [ShardInfo(name, n) for name, (_, n) in shards.items()]))
    return root


def test_inspect_counts_what_an_epoch_of_training_meets_locally_and_over_http(planted_corpus, tokenizer):
    reasons = {
        "not_an_image", "missing_text", "missing_image", "small_image", "corrupt_image", "truncated_shard",
        "shard_longer_than_index", "shard_shorter_than_index", "unreadable_shard",
    }  # fmt: skip
    with serve_http(planted_corpus.parent) as (url, _):
        for location in (str(planted_corpus), f"{url}/{planted_corpus.name}"):
            seen, skipped = epoch_of(data_config(location), tokenizer, world_size=1)
            report = inspect(location, tokenizer)
            assert report["samples"] == len(seen) > 0
            assert report["skipped"] == dict(skipped)
            assert set(skipped) == reasons

