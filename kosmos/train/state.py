"""What the trainer itself must carry across a restart: counters and random-number generators."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included: their data is consumed)
    tokens_seen: int = 0  # non-padding positions over all ranks, image slots included
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    rollbacks: int = 0  # loss-spike rollbacks (kosmos.train.spike)
    rolled_back_samples: int = 0  # documents begun in the data steps rollbacks passed over

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def use_deterministic_algorithms() -> None:
    """`train.deterministic`: every kernel deterministic, so that a run on GPUs repeats bit for bit.

    PyTorch's deterministic algorithms (an operation without one raises, naming itself), cuBLAS with
    a fixed workspace (read when its first handle is made, so set before any CUDA work), no cuDNN
    autotuning; the attention backends narrow to those with a deterministic backward
    (`kosmos.model.attention`), flash-attn's with its `deterministic` flag.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
