"""Shard builders: JSONL text, image-caption lists or shards, and OBELICS-style interleaved documents.

Each writes a corpus folder (shards + index). Input that cannot become a sample is counted by reason
in the index's `skipped` (reported by `kosmos data inspect`) and the build goes on; the loader re-checks
everything it decodes, so builders only check what they must to lay a sample out, and that its text
can be tokenized. Image paths are read only inside the folder they are relative to.
"""

from __future__ import annotations

import contextlib
import csv
import json
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from kosmos.config import ConfigError
from kosmos.data.decode import check_unicode, load_json
from kosmos.data.shards import (
    COMPRESSED_SUFFIXES,
    IMAGE_EXTENSIONS,
    MAX_MEMBER_BYTES,
    CorpusIndex,
    CorpusWriter,
    ShardDamaged,
    decompressed,
    is_hidden,
    read_member,
    split_member_name,
)
from kosmos.data.skips import Reason, SkipSample


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    return path


def read_records(path: Path) -> Iterator[dict | SkipSample]:
    """Rows of a JSONL, Parquet, CSV or TSV file as dicts. A row that cannot be read comes as the
    SkipSample to count (`invalid_utf8`, `invalid_json`, `invalid_csv`) and reading goes on."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    yield _json_record(line)
    else:
        raise ConfigError(f"--input: {path} is not .jsonl, .parquet, .csv or .tsv")


def _json_record(line: bytes) -> dict | SkipSample:
    try:
        record = load_json(line)
    except SkipSample as skip:
        return skip
    return record if isinstance(record, dict) else SkipSample(Reason.INVALID_JSON, "not a JSON object")


def _csv_rows(path: Path, delimiter: str) -> Iterator[dict | SkipSample]:
    # Undecodable bytes are kept as lone surrogates so that they skip their own row only.
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = csv.DictReader(f, delimiter=delimiter)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as error:  # e.g. a field over csv's limit (128 KiB): an unclosed quote
                yield SkipSample(Reason.INVALID_CSV, str(error))
                continue
            try:
                # Cells beyond the header row come as a list under the key None.
                for cell in (*row, *row.values(), *(row.get(None) or ())):
                    if isinstance(cell, str):
                        check_unicode(cell)
            except SkipSample as skip:
                yield skip
                continue
            yield row


def image_member(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of a local image file; a missing, unsupported or oversized file skips its
    sample."""
    extension = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    if extension not in IMAGE_EXTENSIONS:
        raise SkipSample(Reason.NOT_AN_IMAGE, f"{path} is not .jpg, .png or .webp")
    if not path.is_file():
        raise SkipSample(Reason.MISSING_IMAGE, str(path))
    if path.stat().st_size > MAX_MEMBER_BYTES:
        raise SkipSample(Reason.OVERSIZED_MEMBER, f"{path} has {path.stat().st_size} bytes")
    return extension, path.read_bytes()


def image_under(root: Path, relative: object) -> tuple[str, bytes]:
    """`image_member` of the file `relative` names under `root`. A path that leads out of `root`
    (`..`, an absolute path, a symbolic link to elsewhere) skips its sample unread (`path_outside`)."""
    try:
        path = (root / str(relative)).resolve()
        inside = path.is_relative_to(root.resolve())
    except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, a loop of symbolic links
        raise SkipSample(Reason.MISSING_IMAGE, f"{relative!r}: {error}") from None
    if not inside:
        raise SkipSample(Reason.PATH_OUTSIDE, f"{relative!r} is outside {root}")
    return image_member(path)


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
        raise SkipSample(Reason.MISSING_TEXT)
    if not isinstance(value, str):
        raise SkipSample(Reason.INVALID_JSON, f"text {value!r} is not a string")
    if not value.strip():
        raise SkipSample(Reason.EMPTY_TEXT)
    return check_unicode(value).encode()


def _build_from_records(
    inputs: list[Path],
    out: Path,
    kind: str,
    make_sample: Callable[[dict, Path], dict[str, bytes]],
    **shard_options,
) -> CorpusIndex:
    """A corpus of `kind` with one sample per record of the input files: `make_sample(record, path)`
    lays it out, or raises SkipSample; rows that cannot be read are counted (see `read_records`)."""
    for path in inputs:
        _require(path, "--input")
    total = sum(count_records(path) for path in inputs)
    with CorpusWriter(out, kind, **shard_options) as writer, _progress(total, "record", kind) as bar:
        for path in inputs:
            for record in read_records(path):
                bar.update()
                try:
                    if isinstance(record, SkipSample):
                        raise record
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
            raise SkipSample(Reason.MISSING_IMAGE, f"no {image_field!r} field")
        extension, data = image_under(images, record[image_field])
        return {extension: data, "txt": _text(record.get(caption_field))}

    return _build_from_records([captions], out, "caption", pair, **shard_options)


def build_caption_shards(shards: list[Path], out: Path, **shard_options) -> CorpusIndex:
    """Pairs from tar shards already in WebDataset layout (e.g. img2dataset's output): `KEY.jpg`,
    `KEY.txt` and an optional `KEY.json` are kept; other members are dropped unread.

    Nothing is lost uncounted: a key group with a hidden name (`.KEY`, `__KEY__`) is counted as
    `hidden_key`; a key whose suffixes repeat holds several samples that cannot be told apart, each
    counted as `duplicate_key`; damage is read past (`bad_tar_header`, `truncated_shard`). A shard
    may be compressed as the loader reads them (`.tar.gz`, `.tgz`, `.tar.zst`)."""
    for path in shards:
        if not _require(path, "--shards").is_file():  # a FIFO would block the build
            raise ConfigError(f"--shards: {path} is not a regular file")
        try:  # its first header
            with path.open("rb") as file:
                tarfile.TarInfo.frombuf(decompressed(file, path.name).read(tarfile.BLOCKSIZE), "utf-8", "strict")
        except Exception as error:  # noqa: BLE001 - tarfile, gzip and zstandard raise many types on bad data
            raise ConfigError(f"--shards: {path} is not a readable tar file ({error})") from None
    with (
        CorpusWriter(out, "caption", **shard_options) as writer,
        _progress(len(shards), "shard", "caption") as bar,
    ):
        for path in shards:
            bar.update()
            with _plain_tar(path) as plain, tarfile.open(plain, mode="r:") as tar:
                for key, samples in _key_groups(_regular_members(tar, plain, writer.skip)):
                    for members in samples:
                        try:
                            if is_hidden(key):
                                raise SkipSample(Reason.HIDDEN_KEY, key)
                            if len(samples) > 1:
                                raise SkipSample(Reason.DUPLICATE_KEY, key)
                            writer.write(_caption_pair(tar, members))
                        except SkipSample as skip:
                            writer.skip(skip.reason)
                        except ShardDamaged:
                            writer.skip(Reason.TRUNCATED_SHARD)
    return writer.index


@contextlib.contextmanager
def _plain_tar(path: Path) -> Iterator[Path]:
    """The uncompressed tar of a shard: the shard itself, or its decompressed bytes in a temporary
    file (as many as its compression yields: a cut is then met where the tar stops), so that damage
    can be read past."""
    if not path.name.endswith(COMPRESSED_SUFFIXES):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kosmos-build-") as folder, path.open("rb") as file:
        plain = Path(folder) / "plain.tar"
        stream = decompressed(file, path.name)
        # A cut or damaged compression keeps what came before it (gzip and zstandard raise many types);
        # `read1` hands over what it has decompressed before it meets the damage.
        with plain.open("wb") as out, contextlib.suppress(Exception):
            while chunk := stream.read1(1 << 20):
                out.write(chunk)
        yield plain


def _regular_members(
    tar: tarfile.TarFile, path: Path, skip: Callable[[str], None]
) -> Iterator[tarfile.TarInfo]:
    """The tar's file members in order, reading past damage. A stretch without a valid header is
    skipped up to the next valid one and counted once: `bad_tar_header`, or `truncated_shard` when
    it runs to the end of the file (the tar was cut short)."""
    size = path.stat().st_size
    tar.ignore_zeros = True  # step over blocks that are not headers instead of stopping there
    expected = 0  # where the next header should start
    damaged = False
    with path.open("rb") as raw:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError):
                damaged = True
                tar.offset += tarfile.BLOCKSIZE  # past the header that failed
                if tar.offset < size:
                    continue
                member = None
            if member is None:
                # A cut inside the last member read is counted when its sample is read.
                if expected <= size and (damaged or _damaged(raw, expected, size)):
                    skip(Reason.TRUNCATED_SHARD)
                return
            if damaged or _damaged(raw, expected, member.offset):
                skip(Reason.BAD_TAR_HEADER)
            damaged = False
            expected = member.offset_data + _padded(member.size)
            if member.isreg():
                yield member


def _damaged(f, start: int, stop: int) -> bool:
    """Whether the stretch between two members holds anything but zero blocks (the end-of-archive
    marker, padding) and pax global headers (which tarfile reads without returning)."""
    while start < stop:
        f.seek(start)
        block = f.read(tarfile.BLOCKSIZE)
        try:
            header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:  # zeros, garbage, or the end of the file
            if block.count(0) != len(block):
                return True
            start += tarfile.BLOCKSIZE
            continue
        if header.type != tarfile.XGLTYPE:
            return True
        start += tarfile.BLOCKSIZE + _padded(header.size)
    return False


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _key_groups(
    members: Iterator[tarfile.TarInfo],
) -> Iterator[tuple[str, list[dict[str, tarfile.TarInfo]]]]:
    """Runs of members sharing a key, as the loader groups them, each split into its samples: a
    suffix met again under the same key starts another sample."""
    key, samples = None, []
    for member in members:
        member_key, suffix = split_member_name(member.name)
        if member_key != key:
            if samples:
                yield key, samples
            key, samples = member_key, [{}]
        if suffix in samples[-1]:
            samples.append({})
        samples[-1][suffix] = member
    if samples:
        yield key, samples


def _caption_pair(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> dict[str, bytes]:
    image = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        raise SkipSample(Reason.MISSING_IMAGE)
    sample = {
        image.replace("jpeg", "jpg"): read_member(tar, members[image]),
        "txt": _text(_utf8(read_member(tar, members["txt"]) if "txt" in members else None)),
    }
    if "json" in members:
        sample["json"] = read_member(tar, members["json"])
    return sample


def _utf8(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample(Reason.INVALID_UTF8) from None


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
        raise SkipSample(Reason.INVALID_JSON, 'expected "texts" and "images" lists')
    texts, images = record["texts"], record["images"]
    if len(texts) != len(images):
        raise SkipSample(Reason.MISMATCHED_LISTS)
    members: dict[str, bytes] = {}
    names: list[str | None] = []
    for position, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SkipSample(Reason.MISMATCHED_LISTS)
        if image is None:
            if not isinstance(text, str):
                raise SkipSample(Reason.INVALID_JSON, f"text entry {text!r} is not a string")
            check_unicode(text)
            names.append(None)
            continue
        extension, data = image_under(root, image)
        names.append(f"{position}.{extension}")
        members[names[-1]] = data
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise SkipSample(Reason.EMPTY_TEXT)
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
        raise SkipSample(Reason.INVALID_JSON, f"input {triple['input']!r} is not a string")
    check_unicode(triple["input"])
    return {"json": json.dumps(triple).encode()}
