"""The demo's recipe, as `make demo` runs it: the sample corpus, then `configs/train/tiny.yaml` trains
the tiny model under DeepSpeed on CPU, and the trained model reads held-out digits well above chance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import clone_configs

pytestmark = pytest.mark.slow

CHANCE = 10.0  # ten digits


def kosmos(*args: str, cwd) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kosmos", *args],
        cwd=cwd,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A fresh folder in which the demo's training and evaluation commands have run."""
    workdir = tmp_path_factory.mktemp("demo")
    config = str(clone_configs(workdir) / "train/tiny.yaml")
    kosmos("data", "sample", "--out", "sample", cwd=workdir)
    kosmos("train", "--config", config, "--run-dir", "runs/tiny", "logging.progress_bar=false", cwd=workdir)
    kosmos(
        "eval", "--checkpoint", "runs/tiny", "--tasks", "digits_classification,digits_vqa",
        "--data-root", "sample", "--out", "runs/tiny/eval", cwd=workdir,
    )  # fmt: skip
    return workdir


def test_demo_trains_to_the_end(demo):
    assert (demo / "sample/tokenizer.model").is_file() and (demo / "sample/eval/classes.json").is_file()
    records = [json.loads(line) for line in (demo / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    log = [record for record in records if "loss" in record]  # the training records
    config = yaml.safe_load((demo / "runs/tiny/config.yaml").read_text())
    assert log[-1]["step"] == config["train"]["max_steps"]
    assert log[-1]["loss_caption"] < log[0]["loss_caption"] / 4
    validation = [record for record in records if "val_loss" in record]
    assert validation[-1]["step"] == config["train"]["max_steps"]
    assert validation[-1]["val_loss_caption"] < validation[0]["val_loss_caption"] / 2


def test_demo_model_reads_held_out_digits_well_above_chance(demo):
    results = json.loads((demo / "runs/tiny/eval/results.json").read_text())["results"]
    scores = {row["task"]: row for row in results}
    for task in ("digits_classification", "digits_vqa"):
        low = scores[task]["ci"][0]
        assert low > 3 * CHANCE, (task, scores[task])  # the whole bootstrap interval
