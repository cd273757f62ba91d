"""`kosmos report RUN`: one page on a run, finished or still going.

It reads what the run folder holds: `metrics.jsonl` (training records, validation records and
rollbacks), `eval/history.jsonl` (the scores of evaluated checkpoints, `kosmos eval --watch`),
`config.yaml` and the checkpoints, and writes `report.md` with one figure, `report.png`: the
training and validation loss per corpus, the learning rate, the gradient norm, the throughput and
MFU, the samples skipped by reason, and each evaluated task's score over the steps with its interval.
A line being written as the report reads is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

from kosmos.checkpoint import read_latest
from kosmos.config import InputError, read_yaml
from kosmos.train.checkpoint import published_steps

FIGURE = "report.png"
REPORT = "report.md"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a last line still being written is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunRecords:
    """A run folder's records, split by kind."""

    def __init__(self, run_dir: Path):
        if not (run_dir / "metrics.jsonl").is_file():
            raise InputError(f"{run_dir} is not a run folder with a metrics.jsonl")
        self.run_dir = run_dir
        records = read_jsonl(run_dir / "metrics.jsonl")
        self.training = [r for r in records if "loss" in r]
        self.validation = [r for r in records if "val_loss" in r]
        self.rollbacks = [r for r in records if r.get("event") == "rollback"]
        self.evaluations = read_jsonl(run_dir / "eval" / "history.jsonl")
        config = run_dir / "config.yaml"
        self.config = read_yaml(config) if config.is_file() else {}
        self.max_steps = self.config.get("train", {}).get("max_steps")
        self.corpora = [c.get("name") or c["kind"] for c in self.config.get("data", {}).get("corpora", [])]
        if not self.corpora and self.training:
            self.corpora = sorted(k[5:] for k in self.training[-1] if k.startswith("loss_"))
        self.checkpoints = published_steps(run_dir / "checkpoints")
        self.latest = read_latest(run_dir / "checkpoints")

    @property
    def step(self) -> int:
        return max((r["step"] for r in self.training), default=0)

    def series(self, records: list[dict], key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    def task_series(self) -> dict[str, list[dict]]:
        """Per "task metric (shots)", its results in step order (the latest of a step counts)."""
        lines: dict[str, dict[int, dict]] = {}
        for result in self.evaluations:
            if result.get("value") is None:
                continue
            label = f"{result['task']} {result['metric']} ({result['shots']}-shot)"
            lines.setdefault(label, {})[result["step"]] = result
        return {label: [by_step[s] for s in sorted(by_step)] for label, by_step in sorted(lines.items())}


def _mark_rollbacks(axes, run: RunRecords) -> None:
    for i, rollback in enumerate(run.rollbacks):
        axes.axvline(
            rollback["spike_step"],
            color="tab:red",
            linestyle=":",
            linewidth=1,
            label="rollback" if i == 0 else None,
        )


def _loss_panel(axes, run: RunRecords) -> None:
    steps, values = run.series(run.training, "loss")
    axes.plot(steps, values, color="black", linewidth=1.6, label="train (all)")
    colours = {}
    for corpus in run.corpora:
        steps, values = run.series(run.training, f"loss_{corpus}")
        (line,) = axes.plot(steps, values, linewidth=0.9, alpha=0.8, label=f"train {corpus}")
        colours[corpus] = line.get_color()
    steps, values = run.series(run.validation, "val_loss")
    if steps:
        axes.plot(
            steps, values, "o--", color="black", markersize=4, label="validation (all, same rows per corpus)"
        )
    for corpus in run.corpora:
        steps, values = run.series(run.validation, f"val_loss_{corpus}")
        if steps:
            axes.plot(steps, values, "s--", color=colours[corpus], markersize=3, label=f"validation {corpus}")
    _mark_rollbacks(axes, run)
    axes.set_title("Loss per corpus: training (lines) and held-out validation (markers)")
    axes.set_ylabel("loss (nats per labelled token)")
    axes.legend(fontsize="x-small", ncol=2)


def _line_panel(axes, run: RunRecords, key: str, title: str, ylabel: str, log: bool = False) -> None:
    steps, values = run.series(run.training, key)
    axes.plot(steps, values, color="tab:blue", linewidth=1)
    if log and values and min(values) > 0:
        axes.set_yscale("log")
    _mark_rollbacks(axes, run)
    axes.set_title(title)
    axes.set_ylabel(ylabel)


def _throughput_panel(axes, run: RunRecords) -> None:
    steps, values = run.series(run.training, "tokens_per_s")
    axes.plot(steps, values, color="tab:blue", linewidth=1, label="tokens/s")
    axes.set_ylabel("tokens per second (all ranks)", color="tab:blue")
    axes.set_ylim(bottom=0)
    steps, mfu = run.series(run.training, "mfu")
    title = "Throughput"
    if steps:
        twin = axes.twinx()
        twin.plot(steps, [100 * m for m in mfu], color="tab:orange", linewidth=1)
        twin.set_ylabel("MFU (%)", color="tab:orange")
        twin.set_ylim(bottom=0)
        title += " and MFU"
    else:
        title += " (no MFU: no known peak FLOP/s, e.g. on CPU)"
    axes.set_title(title)


def _skipped_panel(axes, run: RunRecords) -> None:
    reasons = sorted({reason for r in run.training for reason in r.get("skipped_samples", {})})
    for reason in reasons:
        steps = [r["step"] for r in run.training]
        axes.plot(steps, [r.get("skipped_samples", {}).get(reason, 0) for r in run.training], label=reason)
    steps, nonfinite = run.series(run.training, "skipped_nonfinite_steps")
    if any(nonfinite):
        axes.plot(steps, nonfinite, "k--", label="non-finite steps (steps)")
    _mark_rollbacks(axes, run)
    axes.set_title("Samples skipped, by reason (since the start)")
    axes.set_ylabel("samples")
    if reasons or any(nonfinite):
        axes.legend(fontsize="x-small")
    else:
        axes.text(0.5, 0.5, "none skipped", transform=axes.transAxes, ha="center")


def _eval_panel(axes, run: RunRecords) -> None:
    lines = run.task_series()
    for label, results in lines.items():
        steps = [r["step"] for r in results]
        (line,) = axes.plot(steps, [r["value"] for r in results], "o-", markersize=3, label=label)
        with_ci = [r for r in results if r.get("ci")]
        if with_ci:
            axes.fill_between(
                [r["step"] for r in with_ci],
                [r["ci"][0] for r in with_ci],
                [r["ci"][1] for r in with_ci],
                color=line.get_color(),
                alpha=0.2,
            )
    axes.set_title("Evaluated checkpoints: score with its 95% interval")
    axes.set_ylabel("score (percent; CIDEr x100)")
    if lines:
        axes.legend(fontsize="x-small")
    else:
        axes.text(0.5, 0.5, "no evaluation yet (kosmos eval --watch)", transform=axes.transAxes, ha="center")


def plot(run: RunRecords, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 2, figsize=(13, 12))
    _loss_panel(axes[0, 0], run)
    _eval_panel(axes[0, 1], run)
    _line_panel(axes[1, 0], run, "lr", "Learning rate (last step of each record)", "learning rate")
    _line_panel(axes[1, 1], run, "grad_norm", "Gradient norm before clipping", "L2 norm", log=True)
    _throughput_panel(axes[2, 0], run)
    _skipped_panel(axes[2, 1], run)
    end = run.max_steps or run.step
    for panel in axes.flat:
        panel.set_xlabel("optimizer step")
        panel.set_xlim(0, max(end, 1))
        panel.grid(alpha=0.3)
    figure.suptitle(_status(run), fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _status(run: RunRecords) -> str:
    name = run.run_dir.resolve().name
    total = f" of {run.max_steps}" if run.max_steps else ""
    state = "finished" if run.max_steps and run.step >= run.max_steps else "in progress"
    seen = run.training[-1]["tokens_seen"] if run.training else 0
    return f"{name}: step {run.step}{total} ({state}), {seen:,} tokens seen"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def markdown(run: RunRecords) -> str:
    lines = [f"# Run report: {run.run_dir.resolve().name}", "", _status(run) + ".", ""]
    checkpoints = ", ".join(str(s) for s in run.checkpoints) or "none yet"
    lines += [f"Checkpoints kept (steps): {checkpoints}; latest: `{run.latest or '-'}`.", ""]
    lines += [f"![training, validation, optimisation, throughput, skips and scores]({FIGURE})", ""]
    if run.training:
        last = run.training[-1]
        val = run.validation[-1] if run.validation else {}
        lines += [
            "## Loss at the last record",
            "",
            "| corpus | training | validation |",
            "| --- | --- | --- |",
        ]
        lines.append(f"| all | {_number(last.get('loss'))} | {_number(val.get('val_loss'))} |")
        for corpus in run.corpora:
            lines.append(
                f"| {corpus} | {_number(last.get(f'loss_{corpus}'))} | {_number(val.get(f'val_loss_{corpus}'))} |"
            )
        step_note = f"training at step {last['step']}"
        lines += [
            "",
            step_note + (f", validation at step {val['step']}" if val else ", no validation yet") + ".",
        ]
        lines += ["", "## Skipped samples (since the start)", ""]
        skipped = ", ".join(f"{k}: {v:,}" for k, v in last.get("skipped_samples", {}).items()) or "none"
        lines += [f"{skipped}; non-finite steps: {last.get('skipped_nonfinite_steps', 0)}.", ""]
    lines += ["## Rollbacks", ""]
    if run.rollbacks:
        lines += [
            "| spike step | reason | back to | data steps passed over | documents |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in run.rollbacks:
            first, last_step = r["data_steps_passed_over"]
            documents = sum(r["samples_passed_over"].values())
            lines.append(
                f"| {r['spike_step']} | {r['reason']} | `{r['checkpoint']}` | {first}-{last_step} | {documents} |"
            )
    else:
        lines.append("none")
    lines += ["", "## Evaluated checkpoints", ""]
    series = run.task_series()
    if series:
        lines += [
            "| task | steps evaluated | latest step | score | 95% interval |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, results in series.items():
            latest = results[-1]
            ci = f"[{latest['ci'][0]:.2f}, {latest['ci'][1]:.2f}]" if latest.get("ci") else "-"
            lines.append(f"| {label} | {len(results)} | {latest['step']} | {latest['value']:.2f} | {ci} |")
    else:
        lines.append("none yet (`kosmos eval --watch RUN --tasks ...`)")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write `report.md` and `report.png` into `out` (default `RUN/report`); returns the page's path."""
    run = RunRecords(run_dir)
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot(run, out / FIGURE)
    page = out / REPORT
    page.write_text(markdown(run))
    return page
