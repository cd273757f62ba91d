"""Exact match and token F1 of extracted answers (WebSRC), by the SQuAD evaluation's rule: both sides
lower-cased, punctuation and the articles a/an/the removed, whitespace collapsed; a prediction gets
its best score over the reference answers."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    return float(any(normalize(prediction) == normalize(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    predicted, wanted = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if not predicted or not wanted:
        return float(predicted == wanted)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """The best F1 over the references of the tokens shared with the prediction."""
    return max(_f1(prediction, r) for r in references)
