"""Loss spikes: which steps are spikes, and the record of a rollback (`train.spike`).

A step whose loss (over all ranks) is over `factor` x the mean loss of the last `window` steps is a
spike; `consecutive` spikes in a row, or `train.max_nonfinite_steps` non-finite steps in a row, roll
the run back to its last checkpoint, as PaLM's authors did by hand: the weights, optimizer, schedule,
counters and random state come back from the checkpoint, and the loader goes on from where it is,
so the data batches read since that checkpoint are passed over on purpose. The statistic starts
empty at each launch and judges only once it holds `window` steps.
"""

from __future__ import annotations

import statistics
from collections import deque

from kosmos.train.config import SpikeConfig


class TrainingDiverged(RuntimeError):
    """Spikes (or non-finite steps) that a rollback may no longer mend."""


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.window)
        self.in_a_row = 0

    def threshold(self) -> float | None:
        """The loss over which a step is a spike; None until `window` steps are in."""
        if len(self.recent) < self.cfg.window:
            return None
        return self.cfg.factor * statistics.fmean(self.recent)

    def observe(self, loss: float | None) -> bool:
        """Note one step's loss (None: the step was not applied); True when the spikes in a row call
        for a rollback."""
        if loss is None:
            return False  # non-finite steps have their own count
        limit = self.threshold()
        if limit is None or loss <= limit:
            self.recent.append(loss)
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        return self.in_a_row >= self.cfg.consecutive

    def reset(self) -> None:
        """After a rollback: the spikes are behind; the statistic of the steps before them stays."""
        self.in_a_row = 0
