"""The Markdown report: a table of scores and a plot of score against number of shots."""

from __future__ import annotations

from pathlib import Path


def _value(entry: dict) -> str:
    if entry["value"] is None:
        return f"unavailable: {entry.get('unavailable') or 'no value'}"
    text = f"{entry['value']:.2f}"
    if entry["trials"] > 1:
        text += f" ± {entry['std']:.2f} ({entry['trials']} trials)"
    return text


def _interval(entry: dict) -> str:
    return "" if not entry.get("ci") else f"[{entry['ci'][0]:.2f}, {entry['ci'][1]:.2f}]"


def plot_scores(summary: list[dict], path: Path) -> bool:
    """Score against shots, one line per task (its first metric); False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = {}
    first_metric: dict[str, str] = {}
    for entry in summary:
        first_metric.setdefault(entry["task"], entry["metric"])
        if entry["metric"] == first_metric[entry["task"]] and entry["value"] is not None:
            lines.setdefault(f"{entry['task']} ({entry['metric']})", []).append(entry)
    if not lines:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, entries in sorted(lines.items()):
        entries.sort(key=lambda e: e["shots"])
        axes.errorbar(
            [e["shots"] for e in entries],
            [e["value"] for e in entries],
            yerr=[e["std"] or 0.0 for e in entries],
            marker="o",
            capsize=3,
            label=label,
        )
    axes.set_xlabel("shots")
    axes.set_ylabel("score")
    axes.set_xticks(sorted({e["shots"] for entries in lines.values() for e in entries}))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(results: dict, out: Path) -> Path:
    summary = results["summary"]
    confidence = round(100 * results["options"]["confidence"])
    lines = [
        "# Evaluation report",
        "",
        f"Checkpoint: `{results['checkpoint'] or 'none'}`  ",
        f"Demonstrations: {results['options']['demos']}, seed {results['options']['seed']}"
        + (f", first {results['options']['limit']} samples per task" if results["options"]["limit"] else ""),
        "",
        f"| task | metric | shots | score | {confidence}% CI (bootstrap) |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for entry in sorted(summary, key=lambda e: (e["task"], e["metric"], e["shots"])):
        cells = (entry["task"], entry["metric"], entry["shots"], _value(entry), _interval(entry))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    baselines = {e["task"]: e["baselines"] for e in summary if e.get("baselines")}
    if baselines:
        lines += ["", "Baselines on the same samples (accuracy):"]
        for task, scores in sorted(baselines.items()):
            lines.append(f"- {task}: " + ", ".join(f"{name} {value:.2f}" for name, value in scores.items()))
    if plot_scores(summary, out / "score_vs_shots.png"):
        lines += ["", "![score against shots](score_vs_shots.png)"]
    lines += [
        "",
        "Per-sample predictions: `predictions/<task>/.../predictions.jsonl`; all values: `results.json`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
