"""The consolidated `model.safetensors` of a checkpoint: the shards' weights in one file, made on first
use and made again when the shards change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kosmos import checkpoint as checkpoint_module
from kosmos import config as config_io
from kosmos.bench.common import synthetic_batch
from kosmos.checkpoint import WEIGHTS, consolidated_state_dict, load_model_from_checkpoint
from kosmos.model import KosmosModel, load_model_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed needs a process group: two ZeRO-2 checkpoints of the tiny model with different weights,
# saved by the trainer's CheckpointManager in a process of their own.
MAKE_CHECKPOINTS = textwrap.dedent(
    """
    import json, sys, torch, deepspeed
    from pathlib import Path
    from kosmos.model import KosmosModel, load_model_config
    from kosmos.train.checkpoint import CheckpointManager
    from kosmos.train.engine import init_distributed

    out, tokenizer, repo = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    init_distributed()
    cfg = load_model_config(out / "model.yaml")
    config = json.loads((repo / "kosmos/configs/deepspeed/zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 1
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        model = KosmosModel(cfg)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        CheckpointManager(out / name / "checkpoints", keep=1, is_main=True).save(engine, 1, {}, cfg, tokenizer)
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = load_model_config(REPO / "configs/model/tiny.yaml", [f"text.vocab_size={tokenizer.vocab_size}"])
    config_io.dump(cfg, out / "model.yaml")
    result = subprocess.run(
        [sys.executable, "-c", MAKE_CHECKPOINTS, str(out), str(tokenizer.model_file), str(REPO)],
        capture_output=True,
        text=True,
        env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def checkpoint_copy(runs: Path, name: str, destination: Path) -> Path:
    """A fresh copy of run `name`'s checkpoint folder (nothing consolidated yet)."""
    (folder,) = (runs / name / "checkpoints").glob("step_*")
    shutil.copytree(folder, destination)
    return destination


def shard_weights(folder: Path) -> dict[str, torch.Tensor]:
    return checkpoint_module._consolidate_shards(folder)


def logits(model: KosmosModel) -> torch.Tensor:
    batch = synthetic_batch(model.cfg, rows=2, seq_len=48, images_per_row=1)
    with torch.no_grad():
        return model(batch.input_ids, batch.image_mask, batch.images).logits


def forbid_shards(monkeypatch) -> None:
    def consolidate(folder):
        raise AssertionError(f"the shards of {folder} were read")

    monkeypatch.setattr(checkpoint_module, "_consolidate_shards", consolidate)


def test_the_consolidated_weights_give_the_shards_logits(runs, tmp_path, monkeypatch):
    folder = checkpoint_copy(runs, "a", tmp_path / "step")
    reference = KosmosModel(load_model_config(folder / "model.yaml"))
    reference.load_state_dict(shard_weights(folder), strict=True)
    reference.eval()

    first, _, _ = load_model_from_checkpoint(folder)  # consolidates the shards, keeps the weights
    assert (folder / WEIGHTS).is_file()
    forbid_shards(monkeypatch)
    second, _, _ = load_model_from_checkpoint(folder)  # reads model.safetensors only
    expected = logits(reference)
    assert torch.equal(logits(first), expected)
    assert torch.equal(logits(second), expected)
    assert first.lm_head.weight.data_ptr() == first.embed_tokens.weight.data_ptr()  # still tied
    assert second.lm_head.weight.data_ptr() == second.embed_tokens.weight.data_ptr()


def test_the_weights_are_made_again_when_the_shards_change(runs, tmp_path):
    folder = checkpoint_copy(runs, "a", tmp_path / "step")
    before = consolidated_state_dict(folder)
    other = checkpoint_copy(runs, "b", tmp_path / "other")
    for shard in other.glob("*.pt"):  # the same file names, other weights
        shutil.copy(shard, folder / shard.name)

    after = consolidated_state_dict(folder)
    expected = shard_weights(other)
    assert any(not torch.equal(before[name], expected[name]) for name in expected)
    assert all(torch.equal(after[name], expected[name]) for name in expected)
    assert all(torch.equal(consolidated_state_dict(folder)[name], expected[name]) for name in expected)


def test_a_damaged_weights_file_is_made_again(runs, tmp_path, monkeypatch):
    folder = checkpoint_copy(runs, "a", tmp_path / "step")
    expected = consolidated_state_dict(folder)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])  # a write cut short by a full disk
    again = consolidated_state_dict(folder)
    assert all(torch.equal(again[name], expected[name]) for name in expected)
    forbid_shards(monkeypatch)
    assert all(torch.equal(consolidated_state_dict(folder)[name], expected[name]) for name in expected)


def test_a_folder_that_cannot_take_the_weights_still_loads(runs, tmp_path, monkeypatch, capsys):
    folder = checkpoint_copy(runs, "a", tmp_path / "step")

    def full_disk(tensors, path, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    state = consolidated_state_dict(folder)
    expected = shard_weights(folder)
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    assert "could not keep the consolidated weights" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir() if "safetensors" in p.name) == []
