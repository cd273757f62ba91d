"""Reading checkpoints, for whatever uses a trained model: evaluation, generation, export, fine-tuning.

A checkpoint folder (`RUN/checkpoints/step_N/`, written by `kosmos.train.checkpoint`) holds DeepSpeed's
ZeRO shards of every rank, `model.yaml` and `tokenizer.model`; `RUN/checkpoints/latest` names the newest
complete one. `load_model_from_checkpoint(path)` gives the model, tokenizer and model config of a run
folder or checkpoint folder, whatever its ZeRO stage and number of ranks.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from kosmos.model import KosmosModel, ModelConfig, load_model_config
from kosmos.tokenizer import Tokenizer

LATEST = "latest"
MODEL_CONFIG = "model.yaml"
TOKENIZER = "tokenizer.model"


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
