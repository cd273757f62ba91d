"""Checkpoints: DeepSpeed saves and loads, published atomically; consolidated loading for eval/export.

Layout of `RUN/checkpoints/`:

```
latest                 # the tag of the newest complete checkpoint, replaced atomically
step_00001000/         # one DeepSpeed checkpoint (ZeRO shards of every rank) plus:
    model.yaml         #   the model config, so the folder loads on its own
    tokenizer.model    #   the SentencePiece model the run was trained with
step_00002000/
zero_to_fp32.py        # DeepSpeed's offline consolidation script
```

A save first goes into `step_N.partial/`; only when every rank has finished writing is it renamed
to `step_N/` and `latest` replaced. A save that dies halfway therefore leaves `latest` pointing at
the previous complete checkpoint, and the leftover `.partial` folder is removed by the next run.
The trainer's own state (data-loader positions and RNG states of every rank, counters) travels as
DeepSpeed client state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from kosmos import config as config_io
from kosmos.model import KosmosModel, ModelConfig, load_model_config
from kosmos.tokenizer import Tokenizer

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
# DeepSpeed's universal form of `step_N/` (for a resume on another world size) lives in `step_N.universal/`.
UNIVERSAL_SUFFIX = ".universal"
MODEL_CONFIG = "model.yaml"
TOKENIZER = "tokenizer.model"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(FileNotFoundError):
    pass


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_latest(root: Path) -> str | None:
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag or None


def published_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))


class CheckpointManager:
    """Saves, publishes, prunes and restores the checkpoints of one run (all ranks call it)."""

    def __init__(self, root: Path, keep: int, is_main: bool):
        self.root = root
        self.keep = keep
        self.is_main = is_main

    def latest_tag(self) -> str | None:
        return read_latest(self.root)

    def latest_path(self) -> Path:
        tag = self.latest_tag()
        if tag is None or not (self.root / tag).is_dir():
            raise CheckpointError(f"{self.root / LATEST} names {tag}, which does not exist")
        return self.root / tag

    def save(self, engine, step: int, client_state: dict[str, Any], model_cfg: ModelConfig, tokenizer: Path):
        tag = checkpoint_tag(step)
        partial = self.root / (tag + PARTIAL_SUFFIX)
        if self.is_main and partial.exists():
            shutil.rmtree(partial)
        engine.save_checkpoint(str(self.root), tag=partial.name, client_state=client_state, save_latest=False)
        # save_checkpoint ends with a barrier: every rank's shards are on disk from here on.
        if self.is_main:
            # The vision weights now live in the checkpoint; loading it must not need the CLIP file.
            vision = dataclasses.replace(model_cfg.vision, weights=None)
            config_io.dump(dataclasses.replace(model_cfg, vision=vision), partial / MODEL_CONFIG)
            shutil.copyfile(tokenizer, partial / TOKENIZER)
            final = self.root / tag
            # Left by a run that died between this rename and publishing it.
            for stale in (final, final.with_name(tag + UNIVERSAL_SUFFIX)):
                if stale.exists():
                    shutil.rmtree(stale)
            os.replace(partial, final)
            _write_atomically(self.root / LATEST, tag)
            self.prune()
        torch.distributed.barrier()

    def prune(self) -> None:
        """Keep the newest `keep` published checkpoints up to `latest` (and their universal forms);
        drop partial and orphan folders."""
        latest = _TAG.match(self.latest_tag() or "")
        latest_step = int(latest.group(1)) if latest else -1
        steps = [s for s in published_steps(self.root) if s <= latest_step]
        keep = {checkpoint_tag(s) for s in steps[-self.keep :]}
        for path in self.root.iterdir():
            tag = path.name.removesuffix(UNIVERSAL_SUFFIX)
            stale = path.name.endswith(PARTIAL_SUFFIX) or (_TAG.match(tag) and tag not in keep)
            if path.is_dir() and stale:
                shutil.rmtree(path)

    def load(self, engine) -> dict[str, Any]:
        """Restore model, optimizer and LR schedule from `latest`; returns the client state."""
        checkpoint = self.latest_path()
        path, client_state = engine.load_checkpoint(str(self.root), tag=checkpoint.name)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {checkpoint}")
        return client_state


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint), its `checkpoints/` folder, or one checkpoint folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        tag = read_latest(root)
        if tag is not None:
            if not (root / tag).is_dir():
                raise CheckpointError(f"{root / LATEST} names {tag}, which does not exist")
            return root / tag
    if (path / MODEL_CONFIG).is_file():
        return path
    raise CheckpointError(f"{path} is neither a run folder with checkpoints nor a checkpoint folder")


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one checkpoint, whatever its ZeRO stage and number of ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        # DeepSpeed reports its progress on stdout, which commands like `kosmos generate` keep for results.
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        # ZeRO-1 leaves frozen weights out of the optimizer shards; they are whole in the module states.
        module_file = checkpoint / "mp_rank_00_model_states.pt"
        if module_file.is_file():
            module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
            for name, tensor in module.items():
                state.setdefault(name, tensor.float() if tensor.is_floating_point() else tensor)
    except Exception as error:  # noqa: BLE001 - a damaged shard can fail in torch.load, pickle, DeepSpeed...
        raise CheckpointError(
            f"checkpoint {checkpoint} could not be read: {type(error).__name__}: {error}"
        ) from None
    return state


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[KosmosModel, Tokenizer, ModelConfig]:
    """The model (eval mode), tokenizer and model config of a run folder or checkpoint folder."""
    checkpoint = resolve_checkpoint(path)
    for name in (MODEL_CONFIG, TOKENIZER):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"checkpoint {checkpoint} has no {name}")
    model_cfg = load_model_config(checkpoint / MODEL_CONFIG)
    tokenizer = Tokenizer(checkpoint / TOKENIZER)
    model = KosmosModel(model_cfg)
    model.load_state_dict(consolidated_state_dict(checkpoint), strict=True)
    return model.to(device).eval(), tokenizer, model_cfg


def load_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Copy the weights of a run folder or checkpoint into `model` (start of a fine-tuning run)."""
    checkpoint = resolve_checkpoint(path)
    try:
        model.load_state_dict(consolidated_state_dict(checkpoint), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the configured model: {error}") from None
    return checkpoint
