"""`kosmos report`: a page on a run folder, written while the run is still going."""

from __future__ import annotations

import json

import yaml
from PIL import Image

from kosmos.cli import main


def write_run(run_dir) -> None:
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "train": {"max_steps": 100},
                "data": {"corpora": [{"kind": "text", "name": ""}, {"kind": "caption", "name": "laion"}]},
            }
        )
    )
    lines = []
    for step in (10, 20, 30):
        lines.append(
            {
                "step": step,
                "loss": 5.0 - step / 10,
                "loss_text": 6.0,
                "loss_laion": 4.0,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1000.0,
                "mfu": None,
                "tokens_seen": step * 100,
                "skipped_samples": {"held_out": step, "rolled_back": 7},
                "skipped_nonfinite_steps": 0,
            }
        )
        if step == 20:
            lines.append({"step": 20, "val_loss": 4.5, "val_loss_text": 6.5, "val_loss_laion": 3.5})
            lines.append(
                {
                    "step": 20,
                    "event": "rollback",
                    "reason": "loss 9 over 6",
                    "spike_step": 25,
                    "checkpoint": "checkpoints/step_00000020",
                    "data_steps_passed_over": [21, 25],
                    "samples_passed_over": {"text": 3, "laion": 4},
                }
            )
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 40, "lo'  # being written
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "eval").mkdir()
    results = [
        {"step": s, "task": "digits_vqa", "metric": "vqa_accuracy", "shots": 0, "value": v, "ci": [v - 5, v + 5]}
        for s, v in ((10, 20.0), (20, 40.0))
    ]
    (run_dir / "eval" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


def test_the_report_of_a_run_in_progress(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.md").read_text()
    assert "step 30 of 100 (in progress), 3,000 tokens seen" in page
    assert "| laion | 4 | 3.5 |" in page  # training and validation loss of a named corpus
    assert "validation at step 20" in page
    assert "held_out: 30, rolled_back: 7" in page
    assert "| 25 | loss 9 over 6 | `checkpoints/step_00000020` | 21-25 | 7 |" in page
    assert "| digits_vqa vqa_accuracy (0-shot) | 2 | 20 | 40.00 | [35.00, 45.00] |" in page
    with Image.open(tmp_path / "out" / "report.png") as figure:
        assert figure.size[0] > 1000 and figure.size[1] > 1000


def test_a_folder_without_metrics_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
