"""ScienceQA accuracy broken down the way its official script reports it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

GRADES_1_6 = {f"grade{i}" for i in range(1, 7)}
GRADES_7_12 = {f"grade{i}" for i in range(7, 13)}

# Name -> which problems the group holds, from a problem's metadata (subject, grade, hint, image).
GROUPS: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "natural": lambda m: m["subject"] == "natural science",
    "social": lambda m: m["subject"] == "social science",
    "language": lambda m: m["subject"] == "language science",
    "has_text": lambda m: bool(m["hint"]),
    "has_image": lambda m: bool(m["image"]),
    "no_context": lambda m: not m["hint"] and not m["image"],
    "grade_1_6": lambda m: m["grade"] in GRADES_1_6,
    "grade_7_12": lambda m: m["grade"] in GRADES_7_12,
}


def scienceqa_breakdown(correct: Sequence[bool], metadata: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy (percent) per subject, context modality and grade band, plus the average.

    A group with no problems in the evaluated set is left out rather than reported as 0.
    """
    if len(correct) != len(metadata):
        raise ValueError("one metadata record per problem is needed")
    out: dict[str, float] = {}
    for name, member in GROUPS.items():
        picked = [c for c, m in zip(correct, metadata) if member(m)]
        if picked:
            out[name] = 100.0 * sum(picked) / len(picked)
    out["average"] = 100.0 * sum(correct) / max(1, len(correct))
    return out
