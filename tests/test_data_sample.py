"""The embedded sample corpus, its held-out eval sets, `kosmos data inspect` and the benchmarks that
read it (`kosmos bench data`, `bench train --packed`, `bench time-to-loss`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from kosmos.cli import main
from kosmos.data import build_loader
from kosmos.data.sample import NUMBER_WORDS, build_sample
from kosmos.data.shards import read_index
from kosmos.tokenizer import Tokenizer
from kosmos.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    assert main(["data", "sample", "--out", str(out)]) == 0
    return out


def members(folder: Path, extension: str) -> list[bytes]:
    found = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(extension)]
    return found


def test_sample_corpus_is_deterministic(sample, tmp_path):
    again = tmp_path / "again"
    build_sample(again)
    files = sorted(p.relative_to(sample) for p in sample.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        if name.suffix != ".model":  # the model file records the paths it was trained from
            assert (sample / name).read_bytes() == (again / name).read_bytes(), name
    first, second = Tokenizer(sample / "tokenizer.model"), Tokenizer(again / "tokenizer.model")
    assert [first.sp.id_to_piece(i) for i in range(first.num_pieces)] == [
        second.sp.id_to_piece(i) for i in range(second.num_pieces)
    ]


def test_sample_corpus_layout_and_tokenizer(sample, capsys):
    assert Tokenizer(sample / "tokenizer.model").vocab_size == 4007  # what configs/model/tiny.yaml expects
    counts = {kind: read_index(sample / kind).num_samples for kind in ("text", "caption", "interleaved")}
    assert all(n > 50 for n in counts.values())
    for kind in counts:
        assert read_index(sample / kind).kind == kind
        assert len(read_index(sample / kind).shards) >= 4  # enough for 2 ranks x 2 workers
    assert main(["data", "inspect", str(sample), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == sum(counts.values())
    assert report["skipped"] == {}
    assert report["tokens"] > 0 and report["images"] >= counts["caption"]


def test_eval_digits_are_held_out_of_training(sample):
    training_images = set(members(sample / "caption", ".png")) | set(members(sample / "interleaved", ".png"))
    eval_dir = sample / "eval"
    tasks = {
        name: [json.loads(line) for line in (eval_dir / f"{name}.jsonl").read_text().splitlines()]
        for name in ("captioning", "vqa", "classification")
    }
    assert len({len(rows) for rows in tasks.values()}) == 1
    for rows in tasks.values():
        for row in rows:
            data = (eval_dir / row["image"]).read_bytes()
            assert data not in training_images
            assert min(Image.open(io.BytesIO(data)).size) >= 64
            assert row["split"] in ("test", "demo")
    for row in tasks["vqa"]:
        assert row["question"] == "What digit is this?" and len(row["answers"]) == 10
    for row in tasks["classification"]:
        assert row["class_name"] == NUMBER_WORDS[row["label"]]
    assert json.loads((eval_dir / "classes.json").read_text()) == list(NUMBER_WORDS)
    test_labels = [row["label"] for row in tasks["classification"] if row["split"] == "test"]
    assert sorted(set(test_labels)) == list(range(10))


def train_config(sample: Path, folder: Path, **data) -> Path:
    recipe = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())
    recipe["model"] = str(REPO / "configs/model/tiny.yaml")
    recipe["tokenizer"] = str(sample / "tokenizer.model")
    for corpus in recipe["data"]["corpora"]:
        corpus["path"] = str(sample / corpus["kind"])
    recipe["data"].update(data)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_tiny_recipe_reads_the_sample(sample, tmp_path):
    cfg = load_train_config(train_config(sample, tmp_path, num_workers=0))
    tokenizer = Tokenizer(cfg.tokenizer)
    loader = build_loader(cfg.data, tokenizer, cfg.model.vision.image_size, cfg.model.connector.num_queries)
    batches = next(iter(loader))
    assert len(batches) == loader.micro_batches_per_step
    assert {s for batch in batches for s in batch.corpora} == {"text", "caption", "interleaved"}
    for batch in batches:
        slots = int(batch.image_mask.sum())
        assert batch.images.shape[0] * cfg.model.connector.num_queries == slots


def test_bench_data_reports_loader_and_bare_loop(sample, tmp_path, capsys):
    config = train_config(sample, tmp_path, num_workers=0)
    assert main(["bench", "data", "--config", str(config), "--steps", "2", "--warmup", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("loader", "bare"):
        assert report[name]["samples_per_s"] > 0 and report[name]["tokens_per_s"] > 0
    assert report["loader_vs_bare"] > 0


def test_bench_time_to_loss_trains_both_sides_alike(sample, tmp_path, capsys):
    pytest.importorskip("transformers")
    config = train_config(sample, tmp_path, num_workers=0)
    small = ["model.text.layers=1", "model.vision.layers=1", "model.vision.trainable_blocks=1"]
    assert main(["bench", "time-to-loss", "--config", str(config), "--steps", "2", "--json", *small]) == 0
    report = json.loads(capsys.readouterr().out)
    ours, theirs = report["ours"], report["theirs"]
    # Same documents and weights: the same losses, though theirs are padded into more positions.
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], abs=1e-4)
    assert report["max_loss_gap"] < 1e-3
    assert ours["labelled_per_step"] == theirs["labelled_per_step"]
    assert theirs["positions_per_step"] > ours["positions_per_step"] - 1
    assert ours["steps_to_target"] is not None and report["speedup"] > 0


@pytest.mark.slow
def test_bench_train_compares_backends_on_packed_rows(sample, tmp_path):
    config = train_config(sample, tmp_path, num_workers=0)
    command = [
        *(sys.executable, "-m", "kosmos", "bench", "train", "--config", str(config), "--json"),
        *("--steps", "1", "--warmup", "1", "--packed", "caption", "--attention", "sdpa,documents,flex"),
        *("model.text.layers=1", "model.vision.layers=1", "model.vision.trainable_blocks=1"),
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["documents_per_row"] > 2 and report["rows"] == "packed from caption"
    assert report["sdpa"]["first_loss"] == pytest.approx(report["documents"]["first_loss"], abs=1e-5)
    assert 0 < report["documents"]["attention_share"] < 1
    assert report["flex"]["backend"] == "forward only" and report["flex"]["attention_forward_s"] > 0
