"""The process group of training, benchmarks and evaluation, joined one way.

Launchers (torchrun, the deepspeed launcher, SLURM with torchrun) describe it in the environment:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. A process started without one becomes a
world of one. On GPUs each rank makes cuda:LOCAL_RANK its current device before NCCL starts: object
collectives and every tensor made on plain "cuda" use the current device, which would otherwise be
cuda:0 on every rank.
"""

from __future__ import annotations

import os
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


def join_process_group(timeout: timedelta | None = None) -> DistributedEnv:
    """Join the launcher's process group (once; NCCL on GPUs, gloo on CPU) on this rank's device."""
    alone = "MASTER_ADDR" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"  # no launcher
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        if alone:  # an in-process store: a world of one listens on no port, so it can meet no other run
            options.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **options)
    return DistributedEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
    )
