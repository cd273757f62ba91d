"""The checkpoint watcher: each checkpoint evaluated once, in step order, across a kill and restart,
never one being written (the harness itself is stood in for; tests/test_train_runs.py runs the real one)."""

from __future__ import annotations

import json

import pytest
import yaml

from kosmos.eval.watch import read_done, watch
from kosmos.train.checkpoint import checkpoint_tag


class Killed(Exception):
    pass


class Evaluator:
    """A stand-in for the harness: one score per checkpoint; `kill_at` dies while evaluating it."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.evaluated: list[int] = []

    def __call__(self, checkpoint, out) -> dict:
        step = int(checkpoint.name.split("_")[1])
        if step == self.kill_at:
            raise Killed
        assert not checkpoint.name.endswith(".partial")
        self.evaluated.append(step)
        return {
            "checkpoint": {"path": str(checkpoint), "step": step, "sha256": f"sha{step}"},
            "options": {"confidence": 0.95},
            "summary": [
                {
                    "task": "digits_vqa",
                    "metric": m,
                    "shots": 0,
                    "value": step + i,
                    "ci": [step, step + 2],
                    "num_samples": 8,
                }
                for i, m in enumerate(("vqa_accuracy", "exact_match"))
            ],
        }


def make_run(tmp_path, steps, max_steps=6):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": max_steps}}))
    for step in steps:
        (run_dir / "checkpoints" / checkpoint_tag(step)).mkdir()
    return run_dir


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval" / "history.jsonl").read_text().splitlines()]


def test_each_checkpoint_is_evaluated_once_across_a_kill_and_a_restart(tmp_path):
    run_dir = make_run(tmp_path, [2, 4])
    (run_dir / "checkpoints" / (checkpoint_tag(6) + ".partial")).mkdir()  # being written
    first = Evaluator(kill_at=4)
    with pytest.raises(Killed):
        watch(run_dir, first, poll_s=0)
    assert first.evaluated == [2]

    # Restarted once the run has published its last checkpoint.
    (run_dir / "checkpoints" / (checkpoint_tag(6) + ".partial")).rename(
        run_dir / "checkpoints" / checkpoint_tag(6)
    )
    second = Evaluator()
    assert watch(run_dir, second, poll_s=0) == 0  # returns once the last step (6) is evaluated
    assert second.evaluated == [4, 6]
    lines = history(run_dir)
    assert [(r["step"], r["metric"]) for r in lines] == [
        (s, m) for s in (2, 4, 6) for m in ("vqa_accuracy", "exact_match")
    ]
    assert lines[2]["checkpoint"]["sha256"] == "sha4" and lines[2]["ci"] == [4, 6] and lines[2]["lines"] == 2
    assert (run_dir / "tensorboard").is_dir()


def test_a_step_cut_short_in_the_history_is_evaluated_again(tmp_path):
    run_dir = make_run(tmp_path, [2, 4])
    watch(run_dir, Evaluator(), once=True)
    path = run_dir / "eval" / "history.jsonl"
    whole = path.read_text().splitlines(keepends=True)
    path.write_text("".join(whole[:3]) + whole[3][:20])  # killed while writing step 4's second line
    assert read_done(path) == {2}
    assert path.read_text() == "".join(whole[:2])
    again = Evaluator()
    watch(run_dir, again, once=True)
    assert again.evaluated == [4] and path.read_text() == "".join(whole)


def test_every_n_steps_and_the_last_and_a_pruned_checkpoint_is_recorded(tmp_path):
    run_dir = make_run(tmp_path, [2, 4, 6, 8], max_steps=9)
    (run_dir / "checkpoints" / checkpoint_tag(9)).mkdir()
    evaluator = Evaluator()

    def pruned_while_waiting(checkpoint, out):
        if checkpoint.name == checkpoint_tag(8):
            checkpoint.rmdir()
            raise FileNotFoundError(checkpoint)
        return evaluator(checkpoint, out)

    watch(run_dir, pruned_while_waiting, every=4, once=True)
    assert evaluator.evaluated == [4, 9]
    assert [r.get("skipped") for r in history(run_dir) if r["step"] == 8] == [
        "pruned (checkpoint.keep) before it was evaluated"
    ]


def test_watch_options_are_checked(tmp_path, capsys):
    from kosmos.cli import main

    run_dir = make_run(tmp_path, [2])
    assert main(["eval", "--watch", str(run_dir), "--tasks", "digits_vqa", "--out", str(tmp_path)]) == 2
    assert "without --checkpoint or --out" in capsys.readouterr().err
    assert main(["eval", "--watch", str(tmp_path), "--tasks", "digits_vqa"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
