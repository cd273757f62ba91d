"""Shard builders: JSONL text, image-caption lists or shards, and OBELICS-style interleaved documents.

Each writes a corpus folder (shards + index). Input that cannot become a sample is counted by reason
in the index's `skipped` (reported by `kosmos data inspect`); the loader re-checks everything it
decodes, so builders only check what they must to lay a sample out.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from kosmos.config import ConfigError
from kosmos.data.shards import IMAGE_EXTENSIONS, CorpusIndex, CorpusWriter, ShardReader, SkipSample


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    return path


def read_records(path: Path) -> Iterator[dict | None]:
    """Rows of a JSONL, Parquet, CSV or TSV file as dicts (None for a JSONL line that is not an object)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                yield record if isinstance(record, dict) else None
    else:
        raise ConfigError(f"--input: {path} is not .jsonl, .parquet, .csv or .tsv")


def image_member(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of a local image file; a missing or unsupported file skips its sample."""
    extension = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    if extension not in IMAGE_EXTENSIONS:
        raise SkipSample("not_an_image", f"{path} is not .jpg, .png or .webp")
    if not path.is_file():
        raise SkipSample("missing_image", str(path))
    return extension, path.read_bytes()


def count_records(path: Path) -> int:
    """How many records `read_records` will yield, for a progress bar (CSV rows spanning several lines
    make it an overestimate)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - (path.suffix.lower() in (".csv", ".tsv"))  # the header


def _progress(total: int, unit: str, kind: str) -> tqdm:
    return tqdm(total=total, unit=unit, desc=f"kosmos data build: {kind}", dynamic_ncols=True)


def _text(value: object) -> bytes:
    if value is None:
        raise SkipSample("missing_text")
    if not isinstance(value, str):
        raise SkipSample("invalid_json", f"text {value!r} is not a string")
    if not value.strip():
        raise SkipSample("empty_text")
    return value.encode()


def _build_from_records(
    inputs: list[Path],
    out: Path,
    kind: str,
    make_sample: Callable[[dict, Path], dict[str, bytes]],
    **shard_options,
) -> CorpusIndex:
    """A corpus of `kind` with one sample per record of the input files: `make_sample(record, path)`
    lays it out, or raises SkipSample; a line that is not a JSON object is skipped as invalid_json."""
    for path in inputs:
        _require(path, "--input")
    total = sum(count_records(path) for path in inputs)
    with CorpusWriter(out, kind, **shard_options) as writer, _progress(total, "record", kind) as bar:
        for path in inputs:
            for record in read_records(path):
                bar.update()
                try:
                    if record is None:
                        raise SkipSample("invalid_json")
                    writer.write(make_sample(record, path))
                except SkipSample as skip:
                    writer.skip(skip.reason)
    return writer.index


def build_text(inputs: list[Path], out: Path, field: str = "text", **shard_options) -> CorpusIndex:
    """One document per JSONL line, from `line[field]`."""
    return _build_from_records(
        inputs, out, "text", lambda record, _: {"txt": _text(record.get(field))}, **shard_options
    )


def build_caption_list(
    captions: Path,
    images: Path,
    out: Path,
    image_field: str = "image",
    caption_field: str = "caption",
    **shard_options,
) -> CorpusIndex:
    """Pairs from a CSV/TSV/JSONL list of (image path relative to `images`, caption)."""
    _require(images, "--images")

    def pair(record: dict, _: Path) -> dict[str, bytes]:
        if not record.get(image_field):
            raise SkipSample("missing_image", f"no {image_field!r} field")
        extension, data = image_member(images / str(record[image_field]))
        return {extension: data, "txt": _text(record.get(caption_field))}

    return _build_from_records([captions], out, "caption", pair, **shard_options)


def build_caption_shards(shards: list[Path], out: Path, **shard_options) -> CorpusIndex:
    """Pairs from tar shards already in WebDataset layout (e.g. img2dataset's output): `KEY.jpg`,
    `KEY.txt` and an optional `KEY.json` are kept; other members are dropped."""
    with (
        CorpusWriter(out, "caption", **shard_options) as writer,
        _progress(len(shards), "shard", "caption") as bar,
    ):
        for path in shards:
            bar.update()
            try:
                reader = ShardReader(_require(path, "--shards"))
            except (OSError, tarfile.TarError) as error:
                raise ConfigError(f"--shards: {path} is not a readable tar file ({error})") from None
            for i in range(len(reader)):
                try:
                    members = reader.read(i).members
                    image = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
                    if image is None:
                        raise SkipSample("missing_image")
                    sample = {
                        image.replace("jpeg", "jpg"): members[image],
                        "txt": _text(_utf8(members.get("txt"))),
                    }
                    if "json" in members:
                        sample["json"] = members["json"]
                    writer.write(sample)
                except SkipSample as skip:
                    writer.skip(skip.reason)
            reader.close()
    return writer.index


def _utf8(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample("invalid_utf8") from None


def build_interleaved(
    inputs: list[Path], out: Path, images: Path | None = None, **shard_options
) -> CorpusIndex:
    """Documents from JSONL/Parquet rows with parallel `texts` and `images` lists (OBELICS layout);
    image entries are local file paths, relative to `images` (default: the input file's folder)."""
    return _build_from_records(
        inputs,
        out,
        "interleaved",
        lambda record, path: _interleaved_sample(record, images or path.parent),
        **shard_options,
    )


def _interleaved_sample(record: dict, root: Path) -> dict[str, bytes]:
    if not all(isinstance(record.get(k), list) for k in ("texts", "images")):
        raise SkipSample("invalid_json", 'expected "texts" and "images" lists')
    texts, images = record["texts"], record["images"]
    if len(texts) != len(images):
        raise SkipSample("mismatched_lists")
    members: dict[str, bytes] = {}
    names: list[str | None] = []
    for position, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SkipSample("mismatched_lists")
        if image is None:
            names.append(None)
            continue
        extension, data = image_member(root / str(image))
        names.append(f"{position}.{extension}")
        members[names[-1]] = data
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise SkipSample("empty_text")
    return {"json": json.dumps({"texts": texts, "images": names}).encode(), **members}


def build_instruction(inputs: list[Path], out: Path, **shard_options) -> CorpusIndex:
    """(instruction, input, output) triples from JSONL/Parquet/CSV rows with those fields (the Alpaca
    layout; `input` may be missing or empty), for language-only instruction tuning."""
    return _build_from_records(inputs, out, "instruction", _instruction_sample, **shard_options)


def _instruction_sample(record: dict, _: Path) -> dict[str, bytes]:
    triple = {
        "instruction": _text(record.get("instruction")).decode(),
        "input": record.get("input") or "",
        "output": _text(record.get("output")).decode(),
    }
    if not isinstance(triple["input"], str):
        raise SkipSample("invalid_json", f"input {triple['input']!r} is not a string")
    return {"json": json.dumps(triple).encode()}
