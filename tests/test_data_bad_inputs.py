"""Planted bad content: the loader, `kosmos data inspect` and the builders count each case under its
reason and go on (no crash, no hang, nothing lost uncounted)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from kosmos.cli import main
from kosmos.config import from_dict
from kosmos.data import DataConfig, build_loader
from kosmos.data.config import CorpusConfig
from kosmos.data.decode import DECODERS, decode_image
from kosmos.data.inspection import inspect
from kosmos.data.shards import CorpusWriter, RawSample, read_index
from kosmos.data.skips import SkipSample

LONE_SURROGATE = "\ud800"
DEEP_JSON = b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b', "images": []}'


def png(size: tuple[int, int] = (64, 64), value: int = 128) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, value).save(out, "PNG")
    return out.getvalue()


def png16(value: int, size: int = 64) -> bytes:
    """A 16-bit grayscale PNG of one value (0..65535), written by hand so that its depth is certain."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + struct.pack(">H", value) * size) * size
    header = struct.pack(">IIBBBBB", size, size, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


TALL_PNG = png((64, 100_000))  # under the pixel cap, but its resize would cost hundreds of MiB


def layout(texts: list, images: list, **members: bytes) -> dict[str, bytes]:
    return {"json": json.dumps({"texts": texts, "images": images}).encode(), **members}


def instruction(**fields: str) -> dict[str, bytes]:
    return {"json": json.dumps({"instruction": "Say it.", "input": "", "output": "Done.", **fields}).encode()}


# Per kind: (sample, skip reason or None when it is kept).
PLANTED = {
    "caption": [
        ({"png": png(), "txt": b"a gray square"}, None),
        ({"png": png16(0x8000), "txt": b"a sixteen-bit gray square"}, None),
        ({"png": TALL_PNG, "txt": b"a very tall strip"}, "extreme_aspect_ratio"),
        ({"png": png(), "txt": b"another gray square"}, None),
    ],
    "interleaved": [
        (layout(["A square.", None], [None, "1.png"], **{"1.png": png()}), None),
        (
            layout([f"Broken {LONE_SURROGATE} text.", None], [None, "1.png"], **{"1.png": png()}),
            "invalid_utf8",
        ),
        ({"json": DEEP_JSON}, "invalid_json"),
        ({"json": b'{"texts": ["bad byte \xff"], "images": [null]}'}, "invalid_utf8"),
        (layout(["A strip.", None], [None, "1.png"], **{"1.png": TALL_PNG}), None),  # the strip is dropped
        (layout(["Plain words."], [None]), None),
    ],
    "instruction": [
        (instruction(), None),
        (instruction(output=f"Bad {LONE_SURROGATE}"), "invalid_utf8"),
        (instruction(input=LONE_SURROGATE), "invalid_utf8"),
        (
            {"json": json.dumps({"texts": ["Q?"], "images": [None], "output": LONE_SURROGATE}).encode()},
            "invalid_utf8",
        ),
        ({"json": DEEP_JSON}, "invalid_json"),
        ({"json": b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"}, "invalid_json"),
        (instruction(output="Also done."), None),
    ],
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted")
    for kind, samples in PLANTED.items():
        with CorpusWriter(root / kind, kind, samples_per_shard=3) as writer:
            for sample, _ in samples:
                writer.write(sample)
    return root


def expected_skips() -> Counter[str]:
    return Counter(why for samples in PLANTED.values() for _, why in samples if why is not None)


@pytest.mark.parametrize(
    ("kind", "position"), [(kind, i) for kind, samples in PLANTED.items() for i in range(len(samples))]
)
def test_decoders_skip_each_planted_case_under_its_reason(kind, position):
    sample, reason = PLANTED[kind][position]
    try:
        DECODERS[kind](RawSample("x", sample), CorpusConfig(kind=kind, path=".", tokens_per_step=1))
    except SkipSample as skip:
        assert skip.reason == reason
    else:
        assert reason is None


def test_loader_counts_planted_cases_and_goes_on(planted, tokenizer):
    corpora = [{"kind": kind, "path": str(planted / kind), "tokens_per_step": 64} for kind in PLANTED]
    cfg = from_dict(
        DataConfig, {"seq_len": 64, "micro_batch_size": 3, "num_workers": 0, "corpora": corpora}, "data"
    )
    loader = build_loader(cfg, tokenizer, 16, 4)
    skipped, arrived = {}, set()
    for step, _ in enumerate(loader, start=1):
        skipped.update(
            {(r.corpus, r.shard, r.index): why for r, why in loader.last_step_skipped if r.epoch == 0}
        )
        arrived.update((r.corpus, r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
        if min(loader.epochs.values()) >= 1:
            break
        assert step < 100
    assert Counter(skipped.values()) == expected_skips()
    kept = sum(why is None for samples in PLANTED.values() for _, why in samples)
    assert len(arrived) == kept
    assert loader.dropped_images.get("extreme_aspect_ratio", 0) >= 1


def test_inspect_counts_planted_cases(planted, tokenizer, capsys):
    report = inspect(planted, tokenizer)
    assert Counter(report["skipped"]) == expected_skips()
    assert report["samples"] == sum(why is None for samples in PLANTED.values() for _, why in samples)
    assert report["corpora"]["interleaved"]["dropped_images"] == {"extreme_aspect_ratio": 1}
    assert main(["data", "inspect", str(planted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == report["skipped"]
    # The text lists every corpus, then the totals over them.
    assert main(["data", "inspect", str(planted)]) == 0
    total = capsys.readouterr().out.split("total", 1)[1]
    assert f"{report['samples']:,} samples" in total and "extreme_aspect_ratio 1" in total
    assert all(f"{reason} {n}" in total for reason, n in report["skipped"].items())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_inspect_shows_its_progress_in_a_terminal(planted, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    report = inspect(planted)
    shown = terminal.getvalue()
    for name, corpus in report["corpora"].items():
        assert f"kosmos data inspect: {name}" in shown and f"{corpus['indexed']}/{corpus['indexed']}" in shown
    assert "sample/s" in shown


def test_index_shows_its_progress_in_a_terminal(planted, tmp_path, monkeypatch):
    from kosmos.data.indexer import index_shards

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    index, _ = index_shards([str(planted / "caption")], tmp_path / "caption", "caption")
    assert "kosmos data index: 100%" in terminal.getvalue()
    assert f"{len(index.shards)}/{len(index.shards)}" in terminal.getvalue()


def test_sixteen_bit_png_keeps_its_gray():
    for value in (0x0000, 0x4000, 0x8000, 0xFFFF):
        assert decode_image(png16(value)).getpixel((0, 0)) == (value >> 8,) * 3


# -- builders ---------------------------------------------------------------------------------------


def build(*args: str | Path) -> int:
    return main(["data", "build", *map(str, args)])


def test_text_builder_counts_bad_bytes_surrogates_and_deep_json(tmp_path, capsys):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "bad byte \xff here"}',
        json.dumps({"text": f"lone {LONE_SURROGATE}"}).encode(),
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        json.dumps({"text": "good two"}).encode(),
    ]
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert build("text", "--input", tmp_path / "docs.jsonl", "--out", tmp_path / "text") == 0
    index = read_index(tmp_path / "text")
    assert index.num_samples == 2
    assert index.skipped == {"invalid_utf8": 2, "invalid_json": 1}
    assert "invalid_utf8" in capsys.readouterr().out
    assert inspect(tmp_path / "text")["samples"] == 2


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of images, a file beside it, and a symbolic link from inside to that file."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png())
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png(value=7))
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "inner-link.png").symlink_to(folder / "a.png")
    return folder


def test_caption_list_counts_bad_rows_and_escaping_paths(tmp_path, images):
    rows = [
        b"image\tcaption",
        b"a.png\ta good square",
        b"sub/b.png\tanother good square",
        b"inner-link.png\ta link that stays inside",
        b"a.png\ta bad byte \xfe here",
        b"a.png\t" + b"x" * (10 << 20),
        b"../secret.png\tclimbs out",
        str(tmp_path / "secret.png").encode() + b"\tan absolute path",
        b"link.png\ta link to outside",
        b"sub/../../secret.png\tclimbs out further down",
        b"a.png\tthe last good square",
    ]
    (tmp_path / "list.tsv").write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "caption"
    assert build("caption", "--input", tmp_path / "list.tsv", "--images", images, "--out", out) == 0
    index = read_index(out)
    assert index.num_samples == 4
    assert index.skipped == {"invalid_utf8": 1, "invalid_csv": 1, "path_outside": 4}
    report = inspect(out)
    assert (report["samples"], report["skipped"]) == (4, index.skipped)


def test_interleaved_builder_refuses_surrogates_deep_json_and_escaping_paths(tmp_path, images):
    docs = [
        json.dumps({"texts": ["Good.", None], "images": [None, "a.png"]}).encode(),
        json.dumps({"texts": [f"Bad {LONE_SURROGATE}.", None], "images": [None, "a.png"]}).encode(),
        json.dumps({"texts": ["Out.", None], "images": [None, "../secret.png"]}).encode(),
        json.dumps({"texts": ["Linked out.", None], "images": [None, "link.png"]}).encode(),
        json.dumps({"texts": [7], "images": [None]}).encode(),
        b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b', "images": []}',
        b'{"texts": ["bad byte \x80"], "images": [null]}',
    ]
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(docs) + b"\n")
    out = tmp_path / "interleaved"
    assert build("interleaved", "--input", tmp_path / "docs.jsonl", "--images", images, "--out", out) == 0
    index = read_index(out)
    assert index.num_samples == 1
    assert index.skipped == {"invalid_utf8": 2, "path_outside": 2, "invalid_json": 2}
    assert inspect(out)["samples"] == 1


def test_instruction_builder_refuses_surrogates_and_deep_json(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Add.", "input": LONE_SURROGATE, "output": "3"},
        {"instruction": "Add.", "output": f"3{LONE_SURROGATE}"},
    ]
    lines = [json.dumps(row).encode() for row in rows]
    lines.append(b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "instruction"
    assert build("instruction", "--input", tmp_path / "rows.jsonl", "--out", out) == 0
    index = read_index(out)
    assert (index.num_samples, index.skipped) == (1, {"invalid_utf8": 2, "invalid_json": 1})
    assert inspect(out)["samples"] == 1


# -- re-sharding img2dataset tars ----------------------------------------------------------------------


def pair(i: int) -> dict[str, bytes]:
    return {"jpg": png(value=i), "txt": f"square {i}".encode()}


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with webdataset.TarWriter(str(path), encoder=False, mtime=0) as tar:
        for key, members in samples:
            tar.write({"__key__": key, **members})


def header_offset(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset


def damaged_shards(tmp_path: Path) -> list[Path]:
    """Shards damaged as img2dataset output can be: garbage between members, cut short, odd keys."""
    # Damage in the middle: a garbage block before sample 2, another in place of sample 4's headers.
    damaged = tmp_path / "damaged.tar"
    write_tar(damaged, [(f"{i:04d}", pair(i)) for i in range(6)])
    data = damaged.read_bytes()
    two, four, five = (header_offset(damaged, f"{i:04d}.jpg") for i in (2, 4, 5))
    garbage = bytes(range(256)) * 2
    data = data[:two] + garbage + data[two:four] + garbage * ((five - four) // 512) + data[five:]
    damaged.write_bytes(data)

    # Cut short in the middle of its last sample's image.
    cut = tmp_path / "cut.tar"
    write_tar(cut, [(f"{i:04d}", pair(i)) for i in range(3)])
    with tarfile.open(cut) as tar:
        last = tar.getmember("0002.jpg")
    cut.write_bytes(cut.read_bytes()[: last.offset_data + last.size // 2])

    # Hidden keys, and a key that holds two samples.
    odd = tmp_path / "odd.tar"
    write_tar(odd, [("0000", pair(0)), (".hidden", pair(1)), ("__meta__", pair(2)), ("0003", pair(3))])
    with tarfile.open(odd, "a") as tar:
        for suffix, data in (*pair(4).items(), *pair(5).items()):
            info = tarfile.TarInfo(f"twice.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [damaged, cut, odd]


def test_caption_shards_count_every_sample_they_leave_out(tmp_path, capsys):
    out = tmp_path / "caption"
    assert build("caption", "--shards", *damaged_shards(tmp_path), "--out", out) == 0
    index = read_index(out)
    assert index.skipped == {"bad_tar_header": 2, "truncated_shard": 1, "hidden_key": 2, "duplicate_key": 2}
    # 5 of 6 damaged (sample 4 is lost in the garbage), 2 of 3 cut, 2 plain ones of the odd shard.
    assert index.num_samples == 5 + 2 + 2
    summary = capsys.readouterr().out
    assert all(reason in summary for reason in index.skipped)
    report = inspect(out)
    assert (report["samples"], report["skipped"]) == (index.num_samples, index.skipped)


def test_compressed_caption_shards_are_built_and_counted_as_the_plain_ones(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    damaged, cut, odd = damaged_shards(tmp_path)
    compressed = [tmp_path / "damaged.tar.gz", tmp_path / "cut.tgz", tmp_path / "odd.tar.zst"]
    compressed[0].write_bytes(gzip.compress(damaged.read_bytes(), mtime=0))
    compressed[1].write_bytes(gzip.compress(cut.read_bytes(), mtime=0))
    compressed[2].write_bytes(zstandard.ZstdCompressor().compress(odd.read_bytes()))
    assert build("caption", "--shards", damaged, cut, odd, "--out", tmp_path / "plain") == 0
    assert build("caption", "--shards", *compressed, "--out", tmp_path / "compressed") == 0
    plain, index = read_index(tmp_path / "plain"), read_index(tmp_path / "compressed")
    assert (index.num_samples, index.skipped) == (plain.num_samples, plain.skipped)
    report = inspect(tmp_path / "compressed")
    assert (report["samples"], report["skipped"]) == (index.num_samples, index.skipped)

    # The compressed stream itself cut short: the samples before the cut are kept, the cut is counted.
    whole = tmp_path / "whole.tar"
    write_tar(whole, [(f"{i:04d}", pair(i)) for i in range(4)])
    packed = gzip.compress(whole.read_bytes(), mtime=0)
    (tmp_path / "cut-stream.tar.gz").write_bytes(packed[: len(packed) * 2 // 3])
    assert build("caption", "--shards", tmp_path / "cut-stream.tar.gz", "--out", tmp_path / "cut-stream") == 0
    index = read_index(tmp_path / "cut-stream")
    assert 1 <= index.num_samples < 4 and index.skipped == {"truncated_shard": 1}
