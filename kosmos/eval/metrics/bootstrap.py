"""Bootstrap confidence intervals for metrics that are a mean over samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    per_sample: Sequence[float], confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean, resampling the samples with replacement."""
    scores = np.asarray(per_sample, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("cannot bootstrap an empty set of scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # Chunks keep memory at chunk * n floats however many samples there are.
    chunk = max(1, min(resamples, 2_000_000 // scores.size))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        picks = rng.integers(0, scores.size, size=(stop - start, scores.size))
        means[start:stop] = scores[picks].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)
