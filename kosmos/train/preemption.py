"""Pre-emption: SIGTERM or SIGUSR1 asks for a checkpoint at the next step boundary, then a clean exit.

The handler only records the signal; the training loop asks all ranks at every step boundary (one
small all-reduce), so a signal that reaches a single rank still stops every rank at the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def anywhere(self, device: torch.device) -> bool:
        """Whether any rank has received a stop signal (a collective: every rank must call it)."""
        flag = torch.tensor([0.0 if self.signal_name is None else 1.0], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0
