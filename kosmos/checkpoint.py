"""Reading checkpoints, for whatever uses a trained model: evaluation, generation, export, fine-tuning.

A checkpoint folder (`RUN/checkpoints/step_N/`, written by `kosmos.train.checkpoint`) holds DeepSpeed's
ZeRO shards of every rank, `model.yaml` and `tokenizer.model`; `RUN/checkpoints/latest` names the newest
complete one. `load_model_from_checkpoint(path)` gives the model, tokenizer and model config of a run
folder or checkpoint folder, whatever its ZeRO stage and number of ranks.

The shards stay the training state. The first use of a checkpoint consolidates them and keeps the
module weights in `model.safetensors` beside them, which later uses read in one go, without
DeepSpeed. That file records what it was made from (the name, size and modification time of every
shard): when the shards change, it is made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kosmos.model import KosmosModel, ModelConfig, load_model_config
from kosmos.tokenizer import Tokenizer

LATEST = "latest"
MODEL_CONFIG = "model.yaml"
TOKENIZER = "tokenizer.model"
WEIGHTS = "model.safetensors"
# The metadata key of WEIGHTS that records the shards it was consolidated from.
_SOURCE = "kosmos.shards"


class CheckpointError(FileNotFoundError):
    pass


def read_latest(root: Path) -> str | None:
    """The tag `root/latest` names, if any (`root` is a run's `checkpoints/` folder)."""
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag or None


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
    """Full fp32 weights of one checkpoint, whatever its ZeRO stage and number of ranks: from its
    `model.safetensors` when that was made from the shards as they are now, else from the shards
    (and kept in `model.safetensors` for the next use)."""
    source = shards_identity(checkpoint)
    state = _read_weights(checkpoint / WEIGHTS, source)
    if state is None:
        state = _consolidate_shards(checkpoint)
        _keep_weights(checkpoint / WEIGHTS, state, source)
    return state


def shards_identity(checkpoint: Path) -> str:
    """A digest of the name, size and modification time of every shard file of `checkpoint`."""
    shards = sorted(checkpoint.glob("*.pt"))
    if not shards:
        raise CheckpointError(f"checkpoint {checkpoint} has no shards (*.pt files)")
    entries = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _read_weights(path: Path, source: str) -> dict[str, torch.Tensor] | None:
    """The weights of `path` if it was consolidated from `source`; None if absent, stale or unreadable."""
    try:
        with safe_open(path, framework="pt") as weights:
            if (weights.metadata() or {}).get(_SOURCE) != source:
                return None
            return {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 - not a dict
    except (OSError, SafetensorError):  # absent, or cut short by a full disk: consolidated again
        return None


def _keep_weights(path: Path, state: dict[str, torch.Tensor], source: str) -> None:
    """Write `state` to `path` atomically; a folder that cannot take it only costs the next use time."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():  # tied weights are one tensor under two names: one copy each
        tensors[name] = tensor.contiguous() if tensor.data_ptr() not in seen else tensor.clone()
        seen.add(tensor.data_ptr())
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, partial, metadata={_SOURCE: source})
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        print(
            f"kosmos: could not keep the consolidated weights in {path} ({error.strerror or error}); "
            "the next use consolidates the shards again",
            file=sys.stderr,
        )


def _consolidate_shards(checkpoint: Path) -> dict[str, torch.Tensor]:
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


def checkpoint_config(path: str | Path) -> tuple[Path, ModelConfig, Tokenizer]:
    """The checkpoint folder a run folder or checkpoint folder resolves to, with its model config and
    tokenizer; no weights are read (checks before a model loads)."""
    checkpoint = resolve_checkpoint(path)
    for name in (MODEL_CONFIG, TOKENIZER):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"checkpoint {checkpoint} has no {name}")
    return checkpoint, load_model_config(checkpoint / MODEL_CONFIG), Tokenizer(checkpoint / TOKENIZER)


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[KosmosModel, Tokenizer, ModelConfig]:
    """The model (eval mode), tokenizer and model config of a run folder or checkpoint folder."""
    checkpoint, model_cfg, tokenizer = checkpoint_config(path)
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
