"""Stop signals: SIGTERM, SIGUSR1 or a first Ctrl-C (SIGINT) ask for a checkpoint at the next step
boundary, then a clean exit; a Ctrl-C while a stop is pending aborts at once (KeyboardInterrupt).

The handler only records the signal; the training loop asks all ranks at every step boundary (one
small all-reduce), so a signal that reaches a single rank still stops every rank at the same step.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if self.signal_name is not None:
                raise KeyboardInterrupt
            # os.write, not print: a handler can interrupt a print, and print is not reentrant.
            os.write(2, b"\ninterrupted: saving a checkpoint at the end of this step (Ctrl-C again aborts)\n")
        self.signal_name = signal.Signals(signum).name

    def anywhere(self, device: torch.device) -> bool:
        """Whether any rank has received a stop signal (a collective: every rank must call it)."""
        flag = torch.tensor([0.0 if self.signal_name is None else 1.0], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def close(self) -> None:
        """Give the signals back to the handlers they had before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
