"""The Markdown report: what was measured (checkpoint, data, samples, units), a table of scores with
their confidence intervals, and a plot of each task's headline score against the number of shots."""

from __future__ import annotations

from pathlib import Path

UNIT = "percent"
UNITS = f"{UNIT} (CIDEr, SPICE, BLEU, METEOR and ROUGE-L x100, as papers report them)"


def _value(entry: dict) -> str:
    if entry["value"] is None:
        return f"unavailable: {entry.get('unavailable') or 'no value'}"
    text = f"{entry['value']:.2f}"
    if entry["trials"] > 1:
        text += f" ± {entry['std']:.2f} ({entry['trials']} trials)"
    return text


def _interval(entry: dict) -> str:
    return "" if not entry.get("ci") else f"[{entry['ci'][0]:.2f}, {entry['ci'][1]:.2f}]"


def _limited(options: dict) -> str:
    if options.get("limit_first"):
        return f", first {options['limit']} samples per task"
    return f", {options['limit']} samples per task drawn with seed {options['seed']}, spread over the answers"


def _checkpoint_line(checkpoint: dict | None) -> str:
    if not checkpoint:
        return "Checkpoint: not given"
    step = "unknown" if checkpoint["step"] is None else checkpoint["step"]
    return f"Checkpoint: `{checkpoint['path']}`, step {step}, weights sha256 `{checkpoint['sha256'][:16]}`"


def _title(checkpoint: dict | None) -> str:
    if not checkpoint or checkpoint["step"] is None:
        return "Evaluation"
    return f"Evaluation at step {checkpoint['step']}"


def _headline(summary: list[dict]) -> dict[str, list[dict]]:
    """Each task's first metric, the entries with a value, in order of shots."""
    lines: dict[str, list[dict]] = {}
    first_metric: dict[str, str] = {}
    for entry in summary:
        first_metric.setdefault(entry["task"], entry["metric"])
        if entry["metric"] == first_metric[entry["task"]] and entry["value"] is not None:
            lines.setdefault(f"{entry['task']} ({entry['metric']})", []).append(entry)
    for entries in lines.values():
        entries.sort(key=lambda e: e["shots"])
    return dict(sorted(lines.items()))


def _error_bars(entries: list[dict]) -> list[list[float]]:
    """Distances from each value down and up to its confidence interval (zero where there is none)."""
    below = [e["value"] - e["ci"][0] if e.get("ci") else 0.0 for e in entries]
    above = [e["ci"][1] - e["value"] if e.get("ci") else 0.0 for e in entries]
    return [below, above]


def score_figure(summary: list[dict], title: str, confidence: int):
    """Each task's headline score with its confidence interval as error bars: against the number of
    shots when several were run, as bars when one was; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = _headline(summary)
    if not lines:
        return None
    shots = sorted({e["shots"] for entries in lines.values() for e in entries})
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if len(shots) == 1:
        labels = list(lines)
        entries = [lines[label][0] for label in labels]
        bars = axes.barh(
            labels, [e["value"] for e in entries], xerr=_error_bars(entries), capsize=4, color="tab:blue"
        )
        # Each bar says its value, beyond its interval's whisker: a score of 0 has no bar to see.
        tops = [e["ci"][1] if e.get("ci") else e["value"] for e in entries]
        for bar, entry, top in zip(bars, entries, tops):
            axes.annotate(
                f"{entry['value']:.1f}", (top, bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                textcoords="offset points", va="center", fontsize="small",
            )  # fmt: skip
        axes.invert_yaxis()
        axes.set_xlabel(f"score ({UNIT}), {confidence}% CI")
        axes.set_title(f"{title}: {shots[0]}-shot")
        value_axis = "x"
    else:
        for label, entries in lines.items():
            axes.errorbar(
                [e["shots"] for e in entries],
                [e["value"] for e in entries],
                yerr=_error_bars(entries),
                marker="o",
                capsize=3,
                label=label,
            )
            for e in entries:
                axes.annotate(
                    f"{e['value']:.1f}", (e["shots"], e["value"]), xytext=(5, 4), textcoords="offset points",
                    fontsize="small",
                )  # fmt: skip
        axes.set_xlabel("shots")
        axes.set_xticks(shots)
        axes.set_ylabel(f"score ({UNIT}), {confidence}% CI")
        axes.set_title(f"{title}: score against shots")
        axes.legend(fontsize="small")
        value_axis = "y"
    # Scores are percentages from 0 up; the axis shows 0 to 100 unless an interval reaches beyond.
    top = max(e["ci"][1] if e.get("ci") else e["value"] for entries in lines.values() for e in entries)
    limits = (0.0, 100.0 if top <= 100.0 else 1.05 * top)
    (axes.set_xlim if value_axis == "x" else axes.set_ylim)(*limits)
    axes.grid(alpha=0.3, axis=value_axis)
    figure.tight_layout()
    return figure


def plot_scores(summary: list[dict], path: Path, title: str, confidence: int) -> bool:
    """`score_figure` saved to `path`; False when there is nothing to plot."""
    import matplotlib.pyplot as plt

    figure = score_figure(summary, title, confidence)
    if figure is None:
        return False
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(results: dict, out: Path) -> Path:
    summary = results["summary"]
    options = results["options"]
    confidence = round(100 * options["confidence"])
    title = _title(results["checkpoint"])
    lines = [
        f"# {title}",
        "",
        _checkpoint_line(results["checkpoint"]) + "  ",
        f"Demonstrations: {options['demos']}, seed {options['seed']}"
        + (_limited(options) if options["limit"] else "")
        + "  ",
        (
            f"Scores: {UNITS}. The interval is the {confidence}% percentile bootstrap interval of the mean "
            "per-sample score (with several trials, of the per-sample scores averaged over them); "
            "± is the spread over trials."
        ),
        "",
        f"| task | metric | shots | samples | score | {confidence}% CI |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    notes = set()
    for entry in sorted(summary, key=lambda e: (e["task"], e["metric"], e["shots"])):
        cells = (
            entry["task"],
            entry["metric"],
            entry["shots"],
            entry["num_samples"],
            _value(entry),
            _interval(entry),
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if entry.get("note"):
            notes.add(f"{entry['task']} {entry['metric']}: {entry['note']}")
    if notes:
        lines += ["", "Notes:", "", *[f"- {note}" for note in sorted(notes)]]
    baselines = {e["task"]: e["baselines"] for e in summary if e.get("baselines")}
    if baselines:
        lines += ["", "Baselines on the same samples (accuracy):"]
        for task, scores in sorted(baselines.items()):
            lines.append(f"- {task}: " + ", ".join(f"{name} {value:.2f}" for name, value in scores.items()))
    if plot_scores(summary, out / "score_vs_shots.png", title, confidence):
        lines += ["", "![scores](score_vs_shots.png)"]
    files = results.get("data_files") or {}
    if any(files.values()):
        lines += ["", "Data files:", ""]
        for task, by_key in sorted(files.items()):
            for key, file in sorted(by_key.items()):
                lines.append(f"- {task} `{key}`: `{file['path']}` (sha256 `{file['sha256'][:16]}`)")
    lines += [
        "",
        "Per-sample predictions: `predictions/<task>/.../predictions.jsonl`; all values: `results.json`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
