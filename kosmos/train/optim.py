"""AdamW over the trainable parameters and the paper's learning-rate schedule."""

from __future__ import annotations

import functools

import torch
from torch import nn

from kosmos.train.config import OptimizerConfig


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Matrices decay; biases, norm weights and the connector's latent queries do not."""
    return param.ndim >= 2 and not name.endswith("latent_query")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if uses_weight_decay(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, offload: bool) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if offload:
        # ZeRO-Offload steps the optimizer on the host; DeepSpeed's vectorised CPU Adam (built on
        # first use) is several times faster there than torch's.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # A torch optimizer needs no compiled DeepSpeed ops; the fused kernel exists on CUDA only.
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kwargs)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Linear warm-up reaching the peak at step `warmup_steps - 1`, then linear decay reaching zero
    at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # Handed to DeepSpeed, which steps it after every applied update and saves it in checkpoints.
    factor = functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def follow_config(schedule: torch.optim.lr_scheduler.LambdaLR, cfg: OptimizerConfig) -> None:
    """Make a restored optimizer and LR schedule use the settings of `cfg`.

    A checkpoint brings back the peak LR, betas, eps and weight decay it was saved with; a resume
    that changes them (say, a lower LR after a loss spike) must take effect from its first step.
    The schedule's shape (warm-up, `train.max_steps`) is not saved and always follows the config.
    """
    optimizer = schedule.optimizer
    schedule.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
        lr = cfg.lr * factor(schedule.last_epoch)
        group.update(initial_lr=cfg.lr, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # the decaying group (`parameter_groups`)
