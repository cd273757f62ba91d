"""Both Multimodal-CoT stages end to end on the sample corpus's ScienceQA-format digits with the tiny
model: shards, fine-tuning through `kosmos train` with the shipped tiny configs, stage-1 rationales,
stage-2 answers read from them by problem id, scores. The stage-2 model answers from its rationale:
given another problem's rationale, its answers change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, clone_configs

from kosmos.cli import main
from kosmos.data.sample import digit_images, split_digits, write_scienceqa_digits
from kosmos.data.scienceqa import gold_rationale, load_dataset

pytestmark = pytest.mark.slow

ENV = {**os.environ, "DS_ACCELERATOR": "cpu"}
TEST_PROBLEMS = 28


def train(workdir: Path, stage: str, *overrides: str) -> str:
    """`kosmos train` with the stage's tiny config, run where its relative paths resolve; its output."""
    command = [
        sys.executable, "-m", "kosmos", "train",
        "--config", str(workdir / f"configs/train/mmcot_{stage}_tiny.yaml"),
        "--run-dir", f"runs/mmcot_tiny/{stage}",
        "model.text.layers=2", "logging.progress_bar=false", "logging.tensorboard=false", *overrides,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def answers(workdir: Path, rationales: Path, out: str) -> dict:
    assert main([
        "mmcot", "answers", "--checkpoint", str(workdir / "runs/mmcot_tiny/answer"),
        "--data", str(workdir / "sample/scienceqa"), "--limit", str(TEST_PROBLEMS),
        "--rationales", str(rationales), "--out", str(workdir / out),
    ]) == 0  # fmt: skip
    return json.loads((workdir / out / "results.json").read_text())


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer) -> Path:
    """The recipe of `make mmcot`, shortened: stage 1 from scratch, stage 2 from stage 1's weights."""
    workdir = tmp_path_factory.mktemp("mmcot")
    clone_configs(workdir)
    sample = workdir / "sample"
    digits, labels = digit_images()
    write_scienceqa_digits(sample / "scienceqa", digits, labels, split_digits(labels))
    shutil.copy(tokenizer.model_file, sample / "tokenizer.model")
    for stage in ("rationale", "answer"):
        assert main([
            "data", "build", "scienceqa", "--root", str(sample / "scienceqa"), "--stage", stage,
            "--out", str(workdir / f"runs/mmcot_tiny/corpora/{stage}"),
        ]) == 0  # fmt: skip
    vocab = f"model.text.vocab_size={tokenizer.vocab_size}"
    train(workdir, "rationale", vocab, "train.init_from=null", "train.max_steps=20")
    assert main([
        "mmcot", "rationales", "--checkpoint", str(workdir / "runs/mmcot_tiny/rationale"),
        "--data", str(sample / "scienceqa"), "--limit", str(TEST_PROBLEMS), "--max-new-tokens", "48",
        "--out", str(workdir / "eval/rationales"),
    ]) == 0  # fmt: skip
    log = train(workdir, "answer", vocab, "train.init_from=runs/mmcot_tiny/rationale", "train.max_steps=150")
    assert f"initialised the weights from {workdir / 'runs/mmcot_tiny/rationale'}" in log
    return workdir


def test_both_stages_run_end_to_end(workdir):
    test_split = [p.pid for p in load_dataset(workdir / "sample/scienceqa", "test")][:TEST_PROBLEMS]
    rationales = records(workdir / "eval/rationales")
    assert [r["id"] for r in rationales] == test_split
    summary = json.loads((workdir / "eval/rationales/results.json").read_text())["rationales"]
    assert summary["problems"] == TEST_PROBLEMS and 0 <= summary["rouge_l"] <= 100

    results = answers(workdir, workdir / "eval/rationales/predictions.jsonl", "eval/answers")
    scores = results["answers"]
    assert results["stage"] == "answer" and scores["problems"] == TEST_PROBLEMS
    assert 0 <= scores["accuracy"] <= 100 and scores["breakdown"]["average"] == scores["accuracy"]
    assert {"natural", "social", "language", "has_text", "has_image", "no_context"} <= set(
        scores["breakdown"]
    )
    assert results["rationales"]["rouge_l"] == pytest.approx(summary["rouge_l"])
    read = {r["id"]: r["rationale"] for r in records(workdir / "eval/answers")}
    assert read == {r["id"]: r["prediction"] for r in rationales}  # each problem read its own

    # Stage 2 trained on its corpus to the end, nothing skipped.
    log = [
        json.loads(line)
        for line in (workdir / "runs/mmcot_tiny/answer/metrics.jsonl").read_text().splitlines()
    ]
    assert log[-1]["step"] == 150 and log[-1]["tokens_scienceqa"] > 0 and log[-1]["skipped_samples"] == {}


def test_stage_two_answers_follow_the_rationale(workdir):
    problems = load_dataset(workdir / "sample/scienceqa", "test")[:TEST_PROBLEMS]

    def write(name: str, rationale_of: dict[str, str]) -> Path:
        path = workdir / name
        path.write_text(
            "".join(json.dumps({"id": p.pid, "prediction": rationale_of[p.pid]}) + "\n" for p in problems)
        )
        return path

    # Each problem's own worked solution, then that of the next problem with another right letter.
    own = {p.pid: gold_rationale(p) for p in problems}
    other = {}
    for i, problem in enumerate(problems):
        donor = next(q for q in problems[i + 1 :] + problems[:i] if q.answer != problem.answer)
        other[problem.pid] = gold_rationale(donor)
    with_own = answers(workdir, write("own.jsonl", own), "eval/own")["answers"]
    with_other = answers(workdir, write("other.jsonl", other), "eval/other")["answers"]

    chosen_own = [r["choice"] for r in records(workdir / "eval/own")]
    chosen_other = [r["choice"] for r in records(workdir / "eval/other")]
    changed = sum(a != b for a, b in zip(chosen_own, chosen_other))
    assert changed >= len(problems) // 2, (Counter(chosen_own), Counter(chosen_other))
    assert with_own["accuracy"] >= with_other["accuracy"] + 30, (with_own, with_other)


def test_the_python_example_of_the_docs_runs(workdir):
    page = (REPO / "docs/mmcot.md").read_text()
    example = page.split("## Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "[:100]" in example
    example = example.replace("[:100]", "[:6]")  # the example as written, on fewer problems
    done = subprocess.run(
        [sys.executable, "-c", example], cwd=workdir, env=ENV, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'problems': 6" in done.stdout and len(records(workdir / "out/answers")) == 6
