"""The DeepSpeed side of training: process-group setup, the DeepSpeed config, the engine."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from kosmos.config import ConfigError
from kosmos.configs import packaged
from kosmos.distributed import DistributedEnv, join_process_group
from kosmos.train.config import TrainConfig
from kosmos.train.optim import build_lr_schedule, build_optimizer


def init_distributed() -> DistributedEnv:
    """Join the process group (`kosmos.distributed`) with DeepSpeed set up for this machine.

    A plain `kosmos train` (no launcher) becomes a world of one, so training always runs through
    the same DeepSpeed engine.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
    import deepspeed
    import deepspeed.ops
    from deepspeed.constants import default_pg_timeout

    if not cuda:
        # DeepSpeed would otherwise JIT-compile a C++ shared-memory all-reduce here (a minute, a
        # compiler, and a build lock shared by every process on the machine); gloo does the job.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    env = join_process_group(timeout=default_pg_timeout)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # DeepSpeed's view of that group
    return env


def use_bf16(setting: str | bool) -> bool:
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("deepspeed.bf16: this GPU does not support bf16 (set false or auto)")
    return bool(setting)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def deepspeed_config(
    cfg: TrainConfig, micro_batches_per_step: int, bf16: bool, load_universal: bool = False
) -> dict[str, Any]:
    """The stock config for the ZeRO stage (and offload), completed from the training config.

    `load_universal`: the engine will load a universal checkpoint (a resume on another world size).
    """
    ds = cfg.deepspeed
    name = f"zero{ds.zero_stage}{'_offload' if ds.offload else ''}.json"
    config = json.loads((packaged("deepspeed") / name).read_text())
    config.update(
        train_micro_batch_size_per_gpu=cfg.data.micro_batch_size,
        gradient_accumulation_steps=micro_batches_per_step,
        gradient_clipping=cfg.optimizer.grad_clip,
        bf16={"enabled": bf16},
        steps_per_print=2**31 - 1,  # the trainer logs; DeepSpeed's own progress lines are noise
        checkpoint={"load_universal": load_universal},
    )
    return _merge(config, ds.extra)


def check_hardware(cfg: TrainConfig, env: DistributedEnv) -> None:
    if cfg.deepspeed.offload and env.device.type != "cuda":
        raise ConfigError("deepspeed.offload: offloading needs a GPU; on CPU everything is in host memory")
    use_bf16(cfg.deepspeed.bf16)


def build_engine(
    cfg: TrainConfig,
    model: torch.nn.Module,
    micro_batches_per_step: int,
    bf16: bool,
    load_universal: bool = False,
):
    """Wrap the model in a DeepSpeed engine with our AdamW and LR schedule (both checkpointed by it)."""
    import deepspeed

    optimizer = build_optimizer(model, cfg.optimizer, cfg.deepspeed.offload)
    schedule = build_lr_schedule(optimizer, cfg.optimizer, cfg.train.max_steps)
    config = deepspeed_config(cfg, micro_batches_per_step, bf16, load_universal)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=config, dist_init_required=False
    )
    return engine
