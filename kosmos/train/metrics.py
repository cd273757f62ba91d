"""Training metrics: `metrics.jsonl`, TensorBoard, optional wandb, and the rank-0 progress bar.

One JSON object per logged step. Losses are means over the labelled tokens of the logged interval's
steps (skipped non-finite steps left out), over all ranks:

  step, loss, loss_<source>      mean next-token loss overall and per corpus
  tokens_<source>                non-padding positions (image slots included) per corpus in the interval
  tokens_seen                    non-padding positions since the start of the run
  lr, grad_norm                  learning rate and gradient norm (before clipping) of the last step
  tokens_per_s                   non-padding positions per second over all ranks
  mfu                            model FLOP utilisation (below), null where the peak is unknown
  memory_gb                      rank 0's peak: allocated GPU memory, or resident host memory on CPU
  skipped_samples                {reason: count} of unusable samples, all ranks, since the start of the run
  dropped_images                 {reason: count} of images left out of kept interleaved documents
  skipped_nonfinite_steps        steps whose loss or gradient was not finite, since the start

and, at each validation point (`train.eval_interval`, and the end), a record of its own:

  step, val_loss, val_loss_<source>  mean loss on the held-out set (`kosmos.train.validation`)
  val_labelled_tokens                labelled tokens of the set, all ranks
  val_seconds                        the validation pass, wall-clock

MFU = FLOPs performed per second / (ranks x peak FLOP/s of one device), the FLOPs counted by
`kosmos.model.flops.training_flops` from the interval's positions, labelled positions, images and
attention pairs (the LM head only where labels are learned; attention per document on the flash-attn
path, else over whole rows). `flops_utilisation` divides them, the language and vision terms apart
(`kosmos bench train` reports both).
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch

from kosmos.train.config import LoggingConfig

# Dense bf16 peak TFLOP/s by device name, most specific names first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("L4", 121.0),
)


def peak_flops(cfg: LoggingConfig, device: torch.device, bf16: bool) -> float | None:
    """Peak FLOP/s of one device: the configured value, or the bf16 figure of a known GPU."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def flops_utilisation(flops: dict[str, float], seconds: float, peak: float) -> dict[str, float]:
    """MFU of `seconds` of training that performed `flops` (`training_flops`), {"language": ...,
    "vision": ...}; the logged `mfu` is their sum. `peak` is the FLOP/s of all the devices together."""
    return {part: value / seconds / peak for part, value in flops.items()}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (steps a resumed run will log again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


class MetricsLogger:
    """Rank 0 writes the records; on other ranks every method does nothing."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        resolved_config: dict[str, Any],
        start_step: int,
        max_steps: int,
        enabled: bool,
    ):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        self.path = run_dir / "metrics.jsonl"
        self.cfg = cfg
        self.file = self.tensorboard = None
        self._open(start_step)
        self.wandb = None
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=run_dir.name,
                id=run_dir.resolve().name,
                resume="allow",
                config=resolved_config,
                dir=str(run_dir),
            )
        self.bar = tqdm(
            total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not cfg.progress_bar
        )

    def _open(self, step: int) -> None:
        """Drop what was logged after `step` and log from there on."""
        truncate_metrics(self.path, step)
        self.file = self.path.open("a")
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a previous attempt logged after the checkpoint we resume from.
            self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=step + 1)

    def rewind(self, step: int) -> None:
        """Back to `step` (a rollback): records and events logged after it are dropped."""
        if not self.enabled:
            return
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self._open(step)
        self.bar.n = step
        self.bar.refresh()

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for group in ("skipped_samples", "dropped_images"):
            scalars.update({f"{group}/{k}": v for k, v in record.get(group, {}).items()})
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if record.get("loss") is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
