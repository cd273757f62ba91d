"""Training config, DeepSpeed config, optimizer groups, LR schedule and checkpoint bookkeeping (no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kosmos.checkpoint import CheckpointError, resolve_checkpoint
from kosmos.config import ConfigError
from kosmos.data.shards import CorpusWriter
from kosmos.model import KosmosModel
from kosmos.train.checkpoint import CheckpointManager, checkpoint_tag
from kosmos.train.config import check_inputs, load_train_config
from kosmos.train.engine import deepspeed_config
from kosmos.train.metrics import truncate_metrics
from kosmos.train.optim import build_lr_schedule, build_optimizer, lr_factor, parameter_groups

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe(tmp_path, tokenizer) -> Path:
    """A training YAML over a one-document text corpus, with the test tokenizer."""
    with CorpusWriter(tmp_path / "text", "text", samples_per_shard=4) as writer:
        writer.write({"txt": b"A short document about nothing in particular."})
    path = tmp_path / "train.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(REPO / "configs/model/tiny.yaml"),
                "tokenizer": str(tokenizer.model_file),
                "data": {
                    "seq_len": 64,
                    "micro_batch_size": 1,
                    "num_workers": 0,
                    "corpora": [{"kind": "text", "path": str(tmp_path / "text"), "tokens_per_step": 64}],
                },
                "train": {"max_steps": 10},
            }
        )
    )
    return path


def vocab(tokenizer) -> str:
    return f"model.text.vocab_size={tokenizer.vocab_size}"


def test_shipped_recipes_load():
    for name in ("tiny", "kosmos1", "kosmos1_instruct"):
        cfg = load_train_config(REPO / f"configs/train/{name}.yaml")
        assert cfg.train.max_steps > cfg.optimizer.warmup_steps


def test_paper_recipe_matches_the_paper():
    cfg = load_train_config(REPO / "configs/train/kosmos1.yaml")
    shares = {c.kind: c.tokens_per_step for c in cfg.data.corpora}
    assert cfg.data.seq_len == 2048 and cfg.train.max_steps == 300_000
    assert sum(shares.values()) == pytest.approx(1.2e6, rel=0.02)
    assert shares["text"] == shares["caption"] == pytest.approx(0.5e6, rel=0.02)
    assert shares["interleaved"] == pytest.approx(0.2e6, rel=0.02)
    opt = cfg.optimizer
    assert (opt.lr, tuple(opt.betas), opt.eps, opt.weight_decay) == (2e-4, (0.9, 0.98), 1e-6, 0.01)
    assert (opt.warmup_steps, opt.grad_clip) == (375, 2.0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("train.max_steps=ten", "train.max_steps"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("deepspeed.zero_stage=0", "deepspeed.zero_stage"),
        ("deepspeed.bf16=maybe", "deepspeed.bf16"),
        ("checkpoint.interval=0", "checkpoint.interval"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("model.text.layerz=2", "model.text.layerz"),
        ("data.seq_len=long", "data.seq_len"),
    ],
)
def test_bad_values_name_their_key(recipe, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(recipe, [override])


def test_input_files_are_checked(recipe, tokenizer, tmp_path):
    check_inputs(load_train_config(recipe, [vocab(tokenizer)]))
    with pytest.raises(ConfigError, match=r"model\.text\.vocab_size"):
        check_inputs(load_train_config(recipe, ["model.text.vocab_size=4007"]))
    with pytest.raises(ConfigError, match="tokenizer"):
        check_inputs(load_train_config(recipe, [vocab(tokenizer), f"tokenizer={tmp_path}/none.model"]))
    missing = "data.corpora=[{kind: text, path: nowhere, tokens_per_step: 64}]"
    with pytest.raises(
        ConfigError, match=r"data\.corpora\[0\]\.path: \S*nowhere does not exist.*kosmos data sample"
    ):
        check_inputs(load_train_config(recipe, [vocab(tokenizer), missing]))
    with pytest.raises(ConfigError, match=r"train\.init_from"):
        check_inputs(load_train_config(recipe, [vocab(tokenizer), "train.init_from=runs/none"]))


@pytest.mark.slow
def test_cli_fails_before_compute(recipe, tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    missing = "data.corpora=[{kind: text, path: nowhere, tokens_per_step: 64}]"
    for overrides, key in (
        (["deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
        ([vocab(tokenizer), missing], "data.corpora[0].path"),
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kosmos",
                "train",
                "--config",
                str(recipe),
                "--run-dir",
                str(run_dir),
                *overrides,
            ],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert key in result.stderr
        assert not run_dir.exists()


def test_deepspeed_config_follows_the_training_config(recipe, tokenizer):
    cfg = load_train_config(
        recipe,
        [
            "deepspeed.zero_stage=3",
            "deepspeed.offload=true",
            "optimizer.grad_clip=1.5",
            "deepspeed.extra={zero_optimization: {stage3_max_live_parameters: 7}, wall_clock_breakdown: true}",
        ],
    )
    ds = deepspeed_config(cfg, micro_batches_per_step=4, bf16=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_max_live_parameters"] == 7 and zero["overlap_comm"] is True  # merged, not replaced
    assert ds["wall_clock_breakdown"] is True
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_clipping"] == 1.5 and ds["bf16"] == {"enabled": True}
    for stage in (1, 2):
        ds = deepspeed_config(load_train_config(recipe, [f"deepspeed.zero_stage={stage}"]), 1, bf16=False)
        assert (
            ds["zero_optimization"]["stage"] == stage and "offload_optimizer" not in ds["zero_optimization"]
        )
        assert ds["bf16"] == {"enabled": False}
    with pytest.raises(ConfigError, match=r"deepspeed\.offload"):
        load_train_config(recipe, ["deepspeed.zero_stage=1", "deepspeed.offload=true"])


def test_weight_decay_spares_biases_norms_and_latent_queries(tiny_config):
    model = KosmosModel(tiny_config)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in parameter_groups(model, 0.01))
    assert decay | no_decay == set(model.trainable_parameter_names())
    assert not decay & no_decay
    assert "connector.latent_query" in no_decay
    assert all(n.endswith(("bias", "latent_query")) or "ln" in n or "norm" in n for n in no_decay)
    assert "embed_tokens.weight" in decay and any(n.endswith("fc1.weight") for n in decay)


def test_lr_schedule_warms_up_then_decays_to_zero(tiny_config):
    opt_cfg = load_train_config(REPO / "configs/train/tiny.yaml").optimizer
    opt_cfg.warmup_steps, opt_cfg.lr = 4, 1.0
    optimizer = build_optimizer(KosmosModel(tiny_config), opt_cfg, offload=False)
    schedule = build_lr_schedule(optimizer, opt_cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_factor(10, 4, 10) == 0.0
    assert optimizer.param_groups[0]["betas"] == opt_cfg.betas


def test_prune_keeps_the_newest_published_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        (root / checkpoint_tag(step)).mkdir(parents=True)
    (root / (checkpoint_tag(50) + ".partial")).mkdir()
    # Universal forms (for a resume on another world size) go with their checkpoints.
    for name in (
        checkpoint_tag(10) + ".universal",
        checkpoint_tag(30) + ".universal",
        checkpoint_tag(20) + ".universal.partial",
    ):
        (root / name).mkdir()
    (root / "latest").write_text(checkpoint_tag(30))  # 40 was renamed but never published
    CheckpointManager(root, keep=2, is_main=True).prune()
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        checkpoint_tag(20),
        checkpoint_tag(30),
        checkpoint_tag(30) + ".universal",
    ]


def test_resolve_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    (root / checkpoint_tag(7)).mkdir(parents=True)
    (root / checkpoint_tag(7) / "model.yaml").write_text("{}")
    (root / "latest").write_text(checkpoint_tag(7))
    assert resolve_checkpoint(tmp_path / "run") == root / checkpoint_tag(7)
    assert resolve_checkpoint(root / checkpoint_tag(7)) == root / checkpoint_tag(7)
    (root / "latest").write_text(checkpoint_tag(8))
    with pytest.raises(CheckpointError, match="step_00000008"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError):
        resolve_checkpoint(tmp_path)


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
