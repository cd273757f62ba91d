"""Training checkpoints: DeepSpeed saves and loads, published atomically (reading them for evaluation
and export is `kosmos.checkpoint`).

Layout of `RUN/checkpoints/`:

```
latest                 # the tag of the newest complete checkpoint, replaced atomically
step_00001000/         # one DeepSpeed checkpoint (ZeRO shards of every rank) plus:
    model.yaml         #   the model config, so the folder loads on its own
    tokenizer.model    #   the SentencePiece model the run was trained with
    model.safetensors  #   the consolidated weights, once inference has loaded it (`kosmos.checkpoint`)
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

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from kosmos import config as config_io
from kosmos.checkpoint import LATEST, MODEL_CONFIG, TOKENIZER, CheckpointError, read_latest
from kosmos.model import ModelConfig

PARTIAL_SUFFIX = ".partial"
# DeepSpeed's universal form of `step_N/` (for a resume on another world size) lives in `step_N.universal/`.
UNIVERSAL_SUFFIX = ".universal"
_TAG = re.compile(r"^step_(\d+)$")


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
        try:
            path, client_state = engine.load_checkpoint(str(self.root), tag=checkpoint.name)
        except (RuntimeError, KeyError, ValueError) as error:  # shapes or layout that do not fit
            raise CheckpointError(
                f"checkpoint {checkpoint} does not fit this run's model or optimizer: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {checkpoint}")
        return client_state
