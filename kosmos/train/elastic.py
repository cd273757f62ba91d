"""Resuming on another number of ranks: ZeRO state through DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds each rank's partition of the optimizer state (and, under ZeRO-3, of the
weights), cut for the world size that wrote it. When a run resumes on another world size, DeepSpeed's
own converter (`deepspeed.checkpoint.ds_to_universal`) rewrites the checkpoint once as one file per
parameter and state (fp32 weights, both Adam moments, the step), and the engine, built with
`checkpoint.load_universal`, cuts those into the new partitions as it loads them.

The universal form of `checkpoints/step_N/` is cached beside it in `checkpoints/step_N.universal/`
(written under a `.partial` name first and renamed when whole; deleted with its checkpoint), so a run
resized again from the same checkpoint does not convert twice.

The random-number generators of a resized run are derived from `train.seed`, the step and the rank
on every rank (ranks are renumbered by a resize, so no rank keeps the generators of the old one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kosmos.checkpoint import CheckpointError
from kosmos.train.checkpoint import PARTIAL_SUFFIX, UNIVERSAL_SUFFIX

CONVERSION_TIMEOUT = timedelta(hours=2)
# The file of each DeepSpeed checkpoint that holds the client state (ZeRO-1/2, then ZeRO-3).
_CLIENT_STATE_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def saved_world_size(checkpoint: Path) -> int:
    """The number of ranks that wrote `checkpoint`, from the trainer's client state."""
    for name in _CLIENT_STATE_FILES:
        if (checkpoint / name).is_file():
            # Memory-mapped: only the small client state is read, not the weights beside it.
            state = torch.load(checkpoint / name, map_location="cpu", mmap=True, weights_only=False)
            saved = state["kosmos"]
            # Checkpoints written before the world size was recorded hold one entry per rank.
            return int(saved.get("world_size", len(saved["ranks"])))
    raise CheckpointError(f"checkpoint {checkpoint} has no DeepSpeed model-state file")


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The seed of `rank`'s generators when a resized run resumes at `step`."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0])


def universal_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + UNIVERSAL_SUFFIX)


def convert_to_universal(checkpoint: Path) -> Path:
    """Write DeepSpeed's universal form of `checkpoint` beside it; returns its folder."""
    from deepspeed.checkpoint import ds_to_universal

    target = universal_path(checkpoint)
    staging = target.with_name(target.name + PARTIAL_SUFFIX)
    if staging.exists():  # left by a conversion that died
        shutil.rmtree(staging)
    # The converter also writes a `latest_universal` file beside its output folder: inside the
    # staging folder, it goes away with it.
    output = staging / checkpoint.name
    args = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(output),
        num_extract_workers=1,  # in this process: the training ranks wait meanwhile
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # Checkpoints of plain data parallelism carry no tensor-parallel layout: declare the empty one.
        inject_missing_state=True,
    )
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the converter reports its progress on stdout
            ds_to_universal.main(args)
            _add_weights_outside_the_optimizer(checkpoint, output / "zero")
    except Exception as error:  # noqa: BLE001 - a damaged shard can fail in torch.load, pickle, DeepSpeed...
        raise CheckpointError(
            f"checkpoint {checkpoint} could not be converted to a universal checkpoint: "
            f"{type(error).__name__}: {error}"
        ) from None
    os.replace(output, target)
    shutil.rmtree(staging)
    return target


def _add_weights_outside_the_optimizer(checkpoint: Path, zero: Path) -> None:
    """Frozen weights are in no optimizer partition. DeepSpeed's converter copies them into the
    universal form from ZeRO-1/2 checkpoints (whose model states hold every weight), not from ZeRO-3
    ones: add those from the consolidated checkpoint, in the converter's own format."""
    from deepspeed.checkpoint.constants import PARAM
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (checkpoint / _CLIENT_STATE_FILES[1]).is_file():  # not ZeRO-3
        return
    # Lazy: only the tensors written here are assembled from the shards.
    weights = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint.parent), checkpoint.name, lazy_mode=True
    )
    for name, tensor in weights.items():
        if not (zero / name / "fp32.pt").is_file():
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save({PARAM: tensor.contiguous().float()}, zero / name / "fp32.pt")


def place_optimizer_steps(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's `step` where torch's AdamW keeps it: on the parameter's device for the fused
    (and capturable) kernels, which read it as a device pointer, else on the CPU. DeepSpeed's universal
    loader leaves every one on the CPU."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(param.device if on_device else "cpu")


@dataclass
class Resize:
    """A resume on `world_size` ranks from `checkpoint`, which `saved_world_size` ranks wrote."""

    checkpoint: Path
    saved_world_size: int
    world_size: int
    conversion_seconds: float | None = None  # None: the universal form was already there

    @property
    def universal(self) -> Path:
        return universal_path(self.checkpoint)

    @classmethod
    def find(cls, checkpoint: Path, world_size: int) -> Resize | None:
        saved = saved_world_size(checkpoint)
        return None if saved == world_size else cls(checkpoint, saved, world_size)

    def prepare(self, is_main: bool) -> None:
        """Rank 0 converts the checkpoint (unless cached) while the others wait."""
        # A large conversion outlasts DeepSpeed's collective timeout (10 minutes unless DEEPSPEED_TIMEOUT
        # says otherwise): the others wait in a group of their own with a longer one.
        waiting = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
        if is_main and not self.universal.is_dir():
            started = time.perf_counter()
            convert_to_universal(self.checkpoint)
            self.conversion_seconds = time.perf_counter() - started
        dist.barrier(group=waiting)
        dist.destroy_process_group(waiting)

    def load(self, engine) -> dict[str, Any]:
        """Weights, optimizer state and LR schedule into an engine built with `checkpoint.load_universal`."""
        path, client_state = engine.load_checkpoint(str(self.universal.parent), tag=self.universal.name)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {self.universal}")
        self._restore_group_settings(engine.optimizer.optimizer)
        place_optimizer_steps(engine.optimizer.optimizer)
        self._restore_frozen_weights(engine.module)
        return client_state

    def _restore_frozen_weights(self, module: torch.nn.Module) -> None:
        # DeepSpeed restores the optimizer's weights only; frozen ones would keep the values the
        # model was built with (random, or another CLIP file), not those the run trained with.
        from deepspeed.checkpoint.constants import PARAM
        from deepspeed.runtime.zero import GatheredParameters

        frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}
        # Under ZeRO-3 every rank gathers the partitioned weights; rank 0's values are kept.
        with GatheredParameters(list(frozen.values()), modifier_rank=0), torch.no_grad():
            for name, param in frozen.items():
                saved = torch.load(self.universal / "zero" / name / "fp32.pt", weights_only=False)[PARAM]
                param.copy_(saved.to(param.dtype))

    def _restore_group_settings(self, optimizer: torch.optim.Optimizer) -> None:
        # DeepSpeed's ZeRO-3 loader gives every parameter group the settings of the first one (the
        # weight decay of the matrices would reach biases and norms): set each group's own again.
        saved = torch.load(self.universal / "zero" / "optimizer_state.pt", weights_only=False)["param_groups"]
        for group, settings in zip(optimizer.param_groups, saved, strict=True):
            group.update({key: value for key, value in settings.items() if key != "params"})

    def describe(self, step: int) -> str:
        how = (
            f"converted to {self.universal} in {self.conversion_seconds:.1f} s"
            if self.conversion_seconds is not None
            else f"through {self.universal}, converted earlier"
        )
        return (
            f"resized: {self.checkpoint} was written by {self.saved_world_size} ranks and resumes at step "
            f"{step} on {self.world_size}; weights, optimizer state and LR schedule through DeepSpeed's "
            f"universal checkpoint ({how}); data positions regrouped from the saved virtual streams; random "
            f"generators derived from train.seed, the step and the rank"
        )
