"""Metrics by name, computed from per-sample prediction records.

A record is a dict written by a runner: `prediction` (text, or the index of the chosen option), and
what the metric compares it with: `references` (captions or human answers), `answer` (index of the
correct option) with `choices`, and `meta` (answer type, ScienceQA subject/grade/context). Every value
is in percent (CIDEr x100, as papers report it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kosmos.eval.metrics.bootstrap import bootstrap_ci
from kosmos.eval.metrics.captions import CAPTION_METRICS, caption_scores, java_available
from kosmos.eval.metrics.extractive import exact_match, token_f1
from kosmos.eval.metrics.scienceqa import scienceqa_breakdown
from kosmos.eval.metrics.vqa import normalize_answer, vizwiz_accuracy, vqa_accuracy

METRICS = (
    *CAPTION_METRICS,
    "vqa_accuracy",
    "vizwiz_accuracy",
    "accuracy",
    "scienceqa_accuracy",
    "roc_auc",
    "exact_match",
    "f1",
)
# Answer scorers of the VQA-style metrics, by name.
VQA_RULES = {"vqa_accuracy": vqa_accuracy, "vizwiz_accuracy": vizwiz_accuracy}
# Scorers of extracted answers against their references (WebSRC), by name.
EXTRACTIVE_RULES = {"exact_match": exact_match, "f1": token_f1}


@dataclass
class MetricResult:
    metric: str
    value: float
    # Scores whose mean is `value`, for a bootstrap interval; None for corpus-level metrics (BLEU, METEOR).
    per_sample: list[float] | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    note: str | None = None


def choice_index(prediction: Any, choices: Sequence[str]) -> int:
    """The option a prediction picks: an index as is, free text by normalised exact match (-1: none)."""
    if isinstance(prediction, int):
        return prediction
    wanted = normalize_answer(str(prediction).strip())
    for i, choice in enumerate(choices):
        if normalize_answer(choice.strip()) == wanted:
            return i
    return -1


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _vqa(name: str, records: Sequence[dict]) -> MetricResult:
    scores, by_type = [], defaultdict(list)
    for r in records:
        score = 100.0 * VQA_RULES[name](r["prediction"], r["references"])
        scores.append(score)
        answer_type = r.get("meta", {}).get("answer_type")
        if answer_type:
            by_type[answer_type].append(score)
    return MetricResult(name, _mean(scores), scores, {t: _mean(s) for t, s in sorted(by_type.items())})


def _roc_auc(records: Sequence[dict]) -> MetricResult:
    """ROC-AUC of a two-choice ranking (Hateful Memes: "no", "yes"): each sample's score is the log-
    likelihood margin of the second choice over the first, the positive label `answer == 1`."""
    from sklearn.metrics import roc_auc_score

    if any(len(r.get("scores", [])) != 2 for r in records):
        raise ValueError("roc_auc needs two scored choices per sample (a rank_choices task with two)")
    labels = [r["answer"] for r in records]
    if len(set(labels)) < 2:
        raise ValueError("roc_auc needs samples of both labels")
    margins = [r["scores"][1] - r["scores"][0] for r in records]
    return MetricResult("roc_auc", 100.0 * roc_auc_score(labels, margins))


def _correct(records: Sequence[dict]) -> list[bool]:
    return [choice_index(r["prediction"], r.get("choices", [])) == r["answer"] for r in records]


def baseline_scores(records: Sequence[dict]) -> dict[str, float]:
    """Accuracy (percent) on the same samples of chance and of the reference solvers whose choices the
    samples carry in `meta["baselines"]`; empty when they carry none."""
    if not records or not all(r.get("meta", {}).get("baselines") for r in records):
        return {}
    scores = {"chance": _mean([100.0 / len(r["choices"]) for r in records])}
    for name in records[0]["meta"]["baselines"]:
        scores[name] = _mean([100.0 * (r["meta"]["baselines"][name] == r["answer"]) for r in records])
    return scores


def compute_metrics(
    names: Sequence[str], records: Sequence[dict]
) -> tuple[list[MetricResult], dict[str, str]]:
    """Results for the metrics in `names` (in that order) and, by name, those that could not run and why."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    if not records:
        raise ValueError("no predictions to score")
    results: list[MetricResult] = []
    unavailable: dict[str, str] = {}
    caption_names = [n for n in names if n in CAPTION_METRICS]
    if caption_names:
        keys = [str(i) for i in range(len(records))]
        scores = caption_scores(
            {k: r["prediction"] for k, r in zip(keys, records)},
            {k: r["references"] for k, r in zip(keys, records)},
            caption_names,
        )
        unavailable.update(scores.unavailable)
        note = (
            "captions tokenised by the pure-Python stand-in for PTBTokenizer (no java)"
            if scores.tokenizer == "python"
            else "captions tokenised by PTBTokenizer (java), as pycocoevalcap does"
        )
        for name in caption_names:
            if name == "bleu" and "bleu_4" in scores.values:
                bleu = {f"bleu_{n}": scores.values[f"bleu_{n}"] for n in range(1, 5)}
                results.append(MetricResult("bleu", bleu["bleu_4"], None, bleu, note))
            elif name in scores.values:
                results.append(MetricResult(name, scores.values[name], scores.per_sample.get(name), {}, note))
    for name in names:
        if name in VQA_RULES:
            results.append(_vqa(name, records))
        elif name == "accuracy":
            correct = [100.0 * c for c in _correct(records)]
            results.append(MetricResult("accuracy", _mean(correct), correct))
        elif name in EXTRACTIVE_RULES:
            scores = [100.0 * EXTRACTIVE_RULES[name](r["prediction"], r["references"]) for r in records]
            results.append(MetricResult(name, _mean(scores), scores))
        elif name == "roc_auc":
            results.append(_roc_auc(records))
        elif name == "scienceqa_accuracy":
            correct = _correct(records)
            breakdown = scienceqa_breakdown(correct, [r["meta"] for r in records])
            results.append(
                MetricResult(
                    "scienceqa_accuracy", breakdown["average"], [100.0 * c for c in correct], breakdown
                )
            )
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: order[r.metric])
    return results, unavailable


__all__ = [
    "METRICS",
    "MetricResult",
    "baseline_scores",
    "bootstrap_ci",
    "caption_scores",
    "choice_index",
    "compute_metrics",
    "exact_match",
    "java_available",
    "scienceqa_breakdown",
    "token_f1",
    "vizwiz_accuracy",
    "vqa_accuracy",
]
