"""`kosmos data build`: JSONL text, caption lists and shards, OBELICS-style interleaved documents."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from kosmos.cli import main
from kosmos.data.inspection import inspect
from kosmos.data.shards import read_index


def image_file(path: Path, size: int = 64, fmt: str = "PNG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 100, 50)).save(path, fmt)
    return path.name


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (80, 64), (10, 20, 30)).save(out, "JPEG")
    return out.getvalue()


def build(*args: str | Path) -> int:
    return main(["data", "build", *map(str, args)])


def test_text_from_jsonl_counts_bad_lines(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(3)]
    lines += [
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": "  "}),
        json.dumps({"text": 7}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert (
        build(
            "text", "--input", tmp_path / "docs.jsonl", "--out", tmp_path / "text", "--samples-per-shard", 2
        )
        == 0
    )
    index = read_index(tmp_path / "text")
    assert (index.kind, index.num_samples, len(index.shards)) == ("text", 3, 2)
    assert index.skipped == {"invalid_json": 2, "missing_text": 1, "empty_text": 1}
    assert inspect(tmp_path / "text")["skipped"] == index.skipped


def test_caption_from_a_list_of_images(tmp_path):
    images = tmp_path / "images"
    rows = [
        ("file", "text"),
        (image_file(images / "a.png"), "a rusty square"),
        (image_file(images / "b.jpeg", fmt="JPEG"), "another square"),
        ("missing.png", "an image that is not there"),
        (image_file(images / "c.png"), ""),
        (image_file(images / "d.bmp", fmt="BMP"), "a bitmap"),
    ]
    (tmp_path / "list.tsv").write_text("".join(f"{f}\t{c}\n" for f, c in rows))
    out = tmp_path / "caption"
    args = [
        "--input",
        tmp_path / "list.tsv",
        "--images",
        images,
        "--image-field",
        "file",
        "--caption-field",
        "text",
    ]
    assert build("caption", *args, "--out", out) == 0
    index = read_index(out)
    assert index.num_samples == 2
    assert index.skipped == {"missing_image": 1, "empty_text": 1, "not_an_image": 1}
    report = inspect(out)
    assert (report["samples"], report["images"]) == (2, 2)


def test_caption_from_img2dataset_shards(tmp_path):
    shard = tmp_path / "00000.tar"
    with webdataset.TarWriter(str(shard), encoder=False) as tar:
        tar.write({"__key__": "000000000", "jpg": jpeg(), "txt": b"a dark photo", "json": b'{"url": "x"}'})
        tar.write({"__key__": "000000001", "jpg": jpeg(), "txt": b"another", "pyd": b"\x80\x04K\x01."})
        tar.write({"__key__": "000000002", "txt": b"its download failed"})
    assert build("caption", "--shards", shard, "--out", tmp_path / "caption") == 0
    index = read_index(tmp_path / "caption")
    assert (index.num_samples, index.skipped) == (2, {"missing_image": 1})
    report = inspect(tmp_path / "caption")
    assert (report["samples"], report["skipped"]) == (2, {"missing_image": 1})


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_interleaved_from_obelics_layout(tmp_path, fmt):
    images = tmp_path / "images"
    docs = [
        {
            "texts": ["A square.", None, "And another.", None],
            "images": [None, image_file(images / "1.png"), None, "2.webp"],
        },
        {"texts": ["Lost picture.", None], "images": [None, "nowhere.png"]},
        {"texts": ["Lists disagree."], "images": [None, None]},
        {"texts": [None], "images": [image_file(images / "3.png")]},
    ]
    image_file(images / "2.webp", fmt="WEBP")
    path = tmp_path / f"docs.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(docs), path)
    else:
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert build("interleaved", "--input", path, "--images", images, "--out", tmp_path / "interleaved") == 0
    index = read_index(tmp_path / "interleaved")
    assert index.num_samples == 1
    assert index.skipped == {"missing_image": 1, "mismatched_lists": 1, "empty_text": 1}
    report = inspect(tmp_path / "interleaved")
    assert (report["samples"], report["images"]) == (1, 2)


def test_build_refuses_a_folder_in_use(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert build("text", "--input", tmp_path / "docs.jsonl", "--out", tmp_path / "out") == 2
    assert "not empty" in capsys.readouterr().err
    assert build("text", "--input", tmp_path / "nope.jsonl", "--out", tmp_path / "new") == 2
    assert "--input" in capsys.readouterr().err
