"""`kosmos eval --watch RUN`: each checkpoint of a run evaluated once, in step order, as it appears.

The trainer writes a checkpoint into `step_N.partial/` and renames it `step_N/` only once every rank
has written it, so the watcher, which takes only `step_N/` folders, never reads one being written.
Each (every `--every`-th step's, and the run's last) is evaluated through the harness into
`RUN/eval/step_N/`, whose prediction cache lets a restarted watcher re-run only what it had not
finished. The results go to `RUN/eval/history.jsonl`, one line per task, metric and shot count
(`step`, `task`, `metric`, `shots`, `value`, `ci`, `confidence`, `num_samples`, `checkpoint` with the
weights' sha256, and `lines`, the count of its step's lines), all of a step's lines in one write
flushed to disk; and to the run's TensorBoard at that step (`eval/<task>/<metric>_<shots>shot`).

A restarted watcher takes the steps in `history.jsonl` as done, after dropping a last step whose
lines were cut short (killed while writing): nothing is evaluated twice, nothing skipped. A
checkpoint that `checkpoint.keep` pruned before its turn is recorded with `skipped` and the reason.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kosmos.config import read_yaml
from kosmos.train.checkpoint import checkpoint_tag, published_steps

HISTORY = "history.jsonl"


def read_done(history: Path) -> set[int]:
    """The steps `history` holds whole; a last step cut short is removed from the file."""
    if not history.is_file():
        return set()
    kept: list[tuple[str, dict]] = []
    for line in history.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n"):
            break
        kept.append((line, record))
    if kept:
        last = kept[-1][1]
        group = [record for _, record in kept if record["step"] == last["step"]]
        if len(group) != last["lines"]:
            kept = [(line, record) for line, record in kept if record["step"] != last["step"]]
    text = "".join(line for line, _ in kept)
    if text != history.read_text():
        history.write_text(text)
    return {record["step"] for _, record in kept}


def _append(history: Path, records: list[dict]) -> None:
    records = [{**record, "lines": len(records)} for record in records]
    with open(history, "a") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
        f.flush()
        os.fsync(f.fileno())


def result_lines(step: int, results: dict) -> list[dict]:
    checkpoint = results["checkpoint"] or {}
    return [
        {
            "step": step,
            "task": entry["task"],
            "metric": entry["metric"],
            "shots": entry["shots"],
            "value": entry["value"],
            "ci": entry["ci"],
            "confidence": results["options"]["confidence"],
            "num_samples": entry["num_samples"],
            "checkpoint": {"path": checkpoint.get("path"), "sha256": checkpoint.get("sha256")},
        }
        for entry in results["summary"]
    ]


def final_step(run_dir: Path) -> int | None:
    """The run's last step (`train.max_steps` of its config), if it says."""
    config = run_dir / "config.yaml"
    return read_yaml(config).get("train", {}).get("max_steps") if config.is_file() else None


def log(message: str) -> None:
    print(f"kosmos eval --watch: {message}", file=sys.stderr, flush=True)


class TensorBoardScores:
    """The scores in the run's TensorBoard, opened at the first one."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / "tensorboard"
        self.writer = None

    def add(self, lines: list[dict]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), filename_suffix=".eval")
        for line in lines:
            if line.get("value") is not None:
                tag = f"eval/{line['task']}/{line['metric']}_{line['shots']}shot"
                self.writer.add_scalar(tag, line["value"], line["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def watch(
    run_dir: Path,
    evaluate: Callable[[Path, Path], dict],
    every: int = 1,
    poll_s: float = 60.0,
    once: bool = False,
) -> int:
    """Evaluate the run's checkpoints as they appear until its last step's is done (`once`: those
    there now). `evaluate(checkpoint, out)` runs the harness on one checkpoint folder into `out` and
    returns its results."""
    root, out = run_dir / "checkpoints", run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    history = out / HISTORY
    done = read_done(history)
    scores = TensorBoardScores(run_dir)
    try:
        while True:
            last = final_step(run_dir)
            for step in published_steps(root):
                if step in done or (step % every and step != last):
                    continue
                folder = root / checkpoint_tag(step)
                try:
                    lines = result_lines(step, evaluate(folder, out / folder.name))
                except Exception:
                    if folder.exists():
                        raise
                    reason = "pruned (checkpoint.keep) before it was evaluated"
                    log(f"step {step}: {reason}")
                    lines = [{"step": step, "skipped": reason}]
                scores.add(lines)
                _append(history, lines)
                done.add(step)
                log(f"step {step}: {len(lines)} results in {history}")
            if once or (last is not None and last in done):
                return 0
            time.sleep(poll_s)
    finally:
        scores.close()
