"""Resume on another world size: a checkpoint of two ranks continues on one and on three, ZeRO-2 and 3.

Every training run is a real `kosmos train` process (under torchrun for several ranks), started through a
wrapper that records, on top of what the trainer does, the full optimizer state right after each
save and right after the resume (DeepSpeed gathers it from the partitions of every rank), and each
rank's batch and torch generator state at the first step after the resume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from kosmos.checkpoint import CheckpointError, consolidated_state_dict
from kosmos.data.sample import build_sample
from kosmos.model import KosmosModel, load_model_config
from kosmos.tokenizer import IGNORE_INDEX
from kosmos.train.checkpoint import checkpoint_tag
from kosmos.train.elastic import Resize, derived_seed

REPO = Path(__file__).resolve().parents[1]
SEED = 7
SMALL = ["model.text.layers=2"]

RECORDING_TRAIN = textwrap.dedent(
    """
    import os, sys, torch
    from deepspeed.utils import (
        lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param, safe_get_full_optimizer_state
    )
    from kosmos.model import KosmosModel
    from kosmos.train.trainer import Trainer

    out = os.environ["RECORD_DIR"]
    build_model = KosmosModel.__init__

    def model_with_other_frozen_weights(self, cfg):
        # As when the frozen weights a run is built with are not those it trained with (another
        # CLIP file, or a seed other than the weights it was initialised from): the resume must
        # bring back the checkpoint's.
        build_model(self, cfg)
        with torch.no_grad():
            for param in self.parameters():
                if not param.requires_grad:
                    param.add_(1.0)

    if os.environ.get("OTHER_FROZEN_WEIGHTS"):
        KosmosModel.__init__ = model_with_other_frozen_weights
    save, resume, train_step = Trainer._save, Trainer._resume, Trainer._train_step

    def optimizer_state(trainer):  # a collective: every rank takes part
        zero = trainer.engine.optimizer
        if hasattr(zero, "single_partition_of_fp32_groups"):
            # ZeRO-1/2 link each weight to its slice of the Adam moments after the first update, but
            # only for the first parameter group; link the others too, or they cannot be gathered.
            for lp_params, hp_flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(lp_params, hp_flat, zero.optimizer.state)
        params = {
            name: {
                "fp32": safe_get_full_fp32_param(param).clone(),
                "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").clone(),
            }
            for name, param in trainer.engine.module.named_parameters()
            if param.requires_grad
        }
        base = trainer.engine.optimizer.optimizer
        steps = sorted({float(state["step"]) for state in base.state.values()})
        groups = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
        return {"params": params, "steps": steps, "groups": groups}

    def recording_save(self):
        save(self)
        state = optimizer_state(self)
        if self.env.is_main:
            torch.save(state, f"{out}/saved_{self.state.step}.pt")

    def recording_resume(self, resize):
        resume(self, resize)
        state = optimizer_state(self)
        if self.env.is_main:
            torch.save(state, f"{out}/resumed.pt")
        self.record_next_step = True

    def recording_step(self, micro_batches):
        if getattr(self, "record_next_step", False):
            record = {"batches": micro_batches, "rng": torch.get_rng_state()}
            torch.save(record, f"{out}/first_step_rank{self.env.rank}.pt")
            self.record_next_step = False
        return train_step(self, micro_batches)

    Trainer._save, Trainer._resume, Trainer._train_step = recording_save, recording_resume, recording_step
    from kosmos.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """Six 64-token rows of each corpus per step: a layout that 1, 2 and 3 ranks all divide."""
    root = tmp_path_factory.mktemp("elastic")
    sample = root / "sample"
    build_sample(sample)
    corpora = [
        {"kind": kind, "path": str(sample / kind), "tokens_per_step": 6 * 64}
        for kind in ("text", "caption", "interleaved")
    ]
    path = root / "train.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(REPO / "configs/model/tiny.yaml"),
                "tokenizer": str(sample / "tokenizer.model"),
                "data": {
                    "seq_len": 64,
                    "micro_batch_size": 3,
                    "num_workers": 0,
                    "virtual_streams": 6,  # up to 6 ranks x workers on resume
                    "corpora": corpora,
                },
                "train": {"max_steps": 3, "log_interval": 1, "seed": SEED},
                "optimizer": {"lr": 2.0e-3, "warmup_steps": 1},
                "checkpoint": {"interval": 2, "keep": 3},
                "logging": {"tensorboard": False, "progress_bar": False},
            }
        )
    )
    return path


def train(recipe: Path, run_dir: Path, record: Path, ranks: int, stage: int, resized: bool = False) -> str:
    record.mkdir(parents=True, exist_ok=True)
    script = record / "recording_train.py"
    script.write_text(RECORDING_TRAIN)
    command = [sys.executable]
    if ranks > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += [str(script), "train", "--config", str(recipe), "--run-dir", str(run_dir), *SMALL]
    command += [f"deepspeed.zero_stage={stage}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RECORD_DIR": str(record)}
    if resized:
        env["OTHER_FROZEN_WEIGHTS"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def first_loss_computed_directly(model: KosmosModel, record: Path, ranks: int) -> float:
    """The mean next-token loss of the step's batches on every rank."""
    loss_sum, labelled = 0.0, 0
    with torch.no_grad():
        for rank in range(ranks):
            for mb in torch.load(record / f"first_step_rank{rank}.pt", weights_only=False)["batches"]:
                output = model(**mb.inputs())
                loss_sum += float(output.token_loss.double().sum())
                labelled += int((mb.labels != IGNORE_INDEX).sum())
    return loss_sum / labelled


def test_the_recorded_world_size_decides_a_resize(tmp_path):
    checkpoint = tmp_path / checkpoint_tag(2)
    checkpoint.mkdir()
    with pytest.raises(CheckpointError, match="no DeepSpeed model-state file"):
        Resize.find(checkpoint, 2)
    state = {"kosmos": {"train": {}, "world_size": 2, "ranks": [{}, {}]}}
    torch.save(state, checkpoint / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert Resize.find(checkpoint, 2) is None
    resize = Resize.find(checkpoint, 3)
    assert (resize.saved_world_size, resize.world_size) == (2, 3)


def test_derived_seeds_differ_by_seed_step_and_rank():
    seeds = {derived_seed(seed, step, rank) for seed in (7, 8) for step in (10, 20) for rank in range(4)}
    assert len(seeds) == 16


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_resume_on_one_and_on_three(recipe, tmp_path, stage):
    straight = tmp_path / "straight"
    train(recipe, straight, tmp_path / "record_straight", ranks=2, stage=stage)
    saved = torch.load(tmp_path / "record_straight" / "saved_2.pt", weights_only=False)
    before = metrics(straight)
    checkpoint = straight / "checkpoints" / checkpoint_tag(2)
    weights = consolidated_state_dict(checkpoint)
    model = KosmosModel(load_model_config(checkpoint / "model.yaml"))
    model.load_state_dict(weights)
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]

    for ranks in (1, 3):
        # A run that stopped after its step-2 checkpoint, back on another number of ranks.
        run_dir, record = tmp_path / f"on_{ranks}", tmp_path / f"record_{ranks}"
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint_tag(2))
        if ranks == 3:  # the universal form the one-rank resume converted is reused, not redone
            universal = checkpoint_tag(2) + ".universal"
            shutil.copytree(
                tmp_path / "on_1" / "checkpoints" / universal, run_dir / "checkpoints" / universal
            )
        (run_dir / "checkpoints" / "latest").write_text(checkpoint_tag(2))
        output = train(recipe, run_dir, record, ranks=ranks, stage=stage, resized=True)

        assert f"written by 2 ranks and resumes at step 2 on {ranks}" in output
        assert ("converted earlier" in output) == (ranks == 3)
        records = metrics(run_dir)
        assert list(records) == [3]  # the run finished
        assert (run_dir / "checkpoints" / "latest").read_text() == checkpoint_tag(3)
        # The LR schedule and the token count carry on.
        assert records[3]["lr"] == before[3]["lr"]
        step_tokens = sum(records[3][f"tokens_{kind}"] for kind in ("text", "caption", "interleaved"))
        assert records[3]["tokens_seen"] == before[2]["tokens_seen"] + step_tokens

        # The optimizer state, gathered from the new partitions, is the one the two ranks saved.
        resumed = torch.load(record / "resumed.pt", weights_only=False)
        assert resumed["steps"] == saved["steps"] == [2.0]
        assert resumed["groups"] == saved["groups"]
        assert set(resumed["params"]) == set(saved["params"])
        for name, states in saved["params"].items():
            for key, tensor in states.items():
                assert torch.equal(resumed["params"][name][key], tensor), (name, key)

        # The frozen weights are the checkpoint's, whatever the model was built with.
        after = consolidated_state_dict(run_dir / "checkpoints" / checkpoint_tag(3))
        assert frozen and all(torch.equal(weights[name], after[name]) for name in frozen)

        # The first loss after the resize is that of the saved weights on the batches it was taken on.
        assert records[3]["loss"] == pytest.approx(
            first_loss_computed_directly(model, record, ranks), rel=1e-5
        )

        # Every rank's generators were derived from the seed, the step and its rank.
        for rank in range(ranks):
            torch.manual_seed(derived_seed(SEED, 2, rank))
            first = torch.load(record / f"first_step_rank{rank}.pt", weights_only=False)
            assert torch.equal(first["rng"], torch.get_rng_state()), rank
