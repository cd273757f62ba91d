"""The checks of `kosmos train` that need no model: made before torch is imported, every problem
reported at once (one line each, exit 2); and the one rule for the paths a config names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kosmos import config as config_io
from kosmos.data.sample import build_sample
from kosmos.train.config import TrainConfig, load_train_config
from kosmos.train.run_folder import CONFIG, HISTORY, resume_changes

# Runs `kosmos train` and reports which heavy packages the process imported by the time it ended.
TRAIN = textwrap.dedent(
    """
    import json, sys
    sys.modules["wandb"] = None  # as where it is not installed
    from kosmos.cli import main
    code = main(["train", *sys.argv[1:]])
    heavy = sorted(m for m in ("torch", "deepspeed", "open_clip", "transformers") if sys.modules.get(m))
    print(json.dumps({"code": code, "imported": heavy}))
    """
)
HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kosmos.train.run_folder import RunLock
    lock = RunLock(Path(sys.argv[1]))
    lock.acquire()
    print("holding", flush=True)
    time.sleep(600)
    """
)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A folder laid out as a clone is: the sample corpus in sample/, a recipe in configs/ naming it
    relative to itself."""
    root = tmp_path_factory.mktemp("clone")
    build_sample(root / "sample")
    (root / "configs").mkdir()
    recipe = {
        "model": str(REPO / "configs/model/tiny.yaml"),
        "tokenizer": "../sample/tokenizer.model",
        "data": {
            "seq_len": 128,
            "micro_batch_size": 2,
            "num_workers": 0,
            "corpora": [
                {"kind": "text", "path": "../sample/text", "tokens_per_step": 256},
                {"kind": "caption", "path": "../sample/caption", "tokens_per_step": 256},
            ],
        },
        "train": {"max_steps": 20},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    (root / "configs/train.yaml").write_text(yaml.safe_dump(recipe))
    return root


def train(cwd: Path, *args: str) -> tuple[dict, list[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", TRAIN, *args],
        check=False,
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(done.stdout.splitlines()[-1]), done.stderr.splitlines(), done.stdout


def test_every_problem_of_a_launch_is_reported_at_once_before_torch_loads(clone, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        planted = [
            "optimizer.learning_rate=1e-3",  # no such key
            "tokenizer=missing.model",  # no such file
            "data.corpora.1.path=nowhere",  # no such corpus
            "data.corpora.0.tokens_per_step=300",  # not a whole number of rows
            "logging.wandb_project=test",  # wandb is not installed
        ]
        outcome, errors, _ = train(
            tmp_path, "--config", str(clone / "configs/train.yaml"), "--run-dir", str(run_dir), *planted
        )
    finally:
        holder.kill()
        holder.wait()
    assert outcome == {"code": 2, "imported": []}
    assert all(line.startswith("kosmos train: config error: ") for line in errors), errors
    text = "\n".join(errors)
    for named in (
        "optimizer.learning_rate: unknown key",
        f"tokenizer: {tmp_path}/missing.model does not exist; train one on the corpora with `kosmos tokenizer train",
        f"data.corpora[1].path: {tmp_path}/nowhere does not exist",
        "data.corpora[0].tokens_per_step: 300 is not a multiple of seq_len x world size = 128 x 1",
        "logging.wandb_project: logging to Weights & Biases needs the wandb package",
        f"{run_dir} is in use by process {holder.pid}",
    ):
        assert named in text, errors
    assert len(errors) == 6
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", ".lock.holder"]  # nothing written


def test_missing_wandb_stops_the_launch_before_the_run_folder_is_made(clone, tmp_path):
    run_dir = tmp_path / "run"
    outcome, errors, _ = train(
        clone, "--config", "configs/train.yaml", "--run-dir", str(run_dir), "logging.wandb_project=test"
    )
    assert outcome["code"] == 2 and len(errors) == 1
    assert 'pip install -e ".[wandb]"' in errors[0]
    assert not run_dir.exists()


def fake_run(run_dir: Path, cfg: TrainConfig, step: int, cwd: str) -> None:
    """A run folder as training leaves it, as far as the launch checks read it."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/latest").write_text(f"step_{step:08d}\n")
    config_io.dump(cfg, run_dir / CONFIG)
    (run_dir / HISTORY).write_text(json.dumps({"cwd": cwd, "config": config_io.to_dict(cfg)}) + "\n")


def test_a_trained_run_and_a_refused_change_are_answered_before_torch_loads(clone, tmp_path):
    cfg = load_train_config(clone / "configs/train.yaml")
    fake_run(tmp_path / "run", cfg, step=20, cwd=str(tmp_path))
    outcome, errors, stdout = train(
        clone, "--config", "configs/train.yaml", "--run-dir", str(tmp_path / "run")
    )
    assert outcome == {"code": 0, "imported": []} and not errors
    assert "latest checkpoint is at step 20, train.max_steps is 20" in stdout

    outcome, errors, _ = train(
        clone, "--config", "configs/train.yaml", "--run-dir", str(tmp_path / "run"), "optimizer.lr=1e-5"
    )
    assert outcome == {"code": 2, "imported": []}
    assert "optimizer.lr: 0.0002 -> 1e-05" in "\n".join(errors)


def test_paths_are_relative_to_the_file_that_names_them(clone, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere but the clone
    cfg = load_train_config(clone / "configs/train.yaml", ["data.corpora.1.path=here/caption"])
    assert cfg.tokenizer == str(clone / "sample/tokenizer.model")
    assert cfg.data.corpora[0].path == str(clone / "sample/text")
    assert cfg.data.corpora[1].path == str(
        tmp_path / "here/caption"
    )  # the command line's: the working folder's
    assert cfg.model.vision.weights is None and cfg.train.init_from is None
    with_urls = load_train_config(clone / "configs/train.yaml", ["data.corpora.1.path=s3://bucket/caption"])
    assert with_urls.data.corpora[1].path == "s3://bucket/caption"


def test_a_run_folder_of_relative_paths_resumes_from_anywhere(clone, tmp_path, monkeypatch):
    """A run recorded its config with paths relative to the folder it was launched from."""
    cfg = load_train_config(clone / "configs/train.yaml")
    old = config_io.to_dict(cfg)
    old["tokenizer"] = "sample/tokenizer.model"
    for corpus in old["data"]["corpora"]:
        corpus["path"] = os.path.relpath(corpus["path"], clone)
    run_dir = tmp_path / "run"
    fake_run(run_dir, cfg, step=10, cwd=str(clone))
    (run_dir / CONFIG).write_text(yaml.safe_dump(old))
    monkeypatch.chdir(tmp_path)
    assert resume_changes(run_dir, cfg, []) == []


def test_every_key_problem_of_a_config_is_named_together(tmp_path):
    recipe = tmp_path / "train.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(REPO / "configs/model/tiny.yaml"),
                "tokenizer": "sp.model",
                "data": {
                    "micro_batch_size": 0,
                    "corpora": [{"kind": "text", "path": "t", "tokens_per_step": "many"}],
                },
                "train": {"max_steps": "long", "seed": 1},
                "optimizer": {"lr": -1.0, "beta": 0.9},
            }
        )
    )
    with pytest.raises(config_io.ConfigProblems) as refused:
        load_train_config(recipe, ["checkpoint.keep=0"])
    assert refused.value.problems == [
        "data.corpora[0].tokens_per_step: expected an integer, got 'many'",
        "train.max_steps: expected an integer, got 'long'",
        "optimizer.beta: unknown key (known: betas, eps, grad_clip, lr, warmup_steps, weight_decay)",
        "optimizer.lr: must not be negative",
        "checkpoint.keep: must be at least 1",
    ]
