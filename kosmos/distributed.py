"""The process group of training, benchmarks and evaluation, joined one way.

Launchers (torchrun, the deepspeed launcher, SLURM with torchrun) describe it in the environment:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. A process started without one becomes a
world of one. On GPUs each rank makes cuda:LOCAL_RANK its current device before NCCL starts: object
collectives and every tensor made on plain "cuda" use the current device, which would otherwise be
cuda:0 on every rank.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK where CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(timeout: timedelta | None = None) -> DistributedEnv:
    """Join the launcher's process group (once; NCCL on GPUs, gloo on CPU) on this rank's device."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **options)
    return DistributedEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
    )
