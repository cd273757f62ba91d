"""The CLIP vision tower: an open_clip ViT in the OpenAI layout, all 257 tokens out, frozen but its top."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from kosmos.model.config import VisionConfig


class VisionWeightsError(ValueError):
    pass


class VisionEncoder(nn.Module):
    """Image -> [N, tokens, width] features: every token through `ln_post`, then L2-normalised.

    The CLIP projection is not used (it is removed, so its weights are neither trained nor saved).
    Only the last `trainable_blocks` transformer blocks take gradients.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        # QuickGELU: OpenAI's weights were trained with it; plain GELU silently gives wrong features.
        self.tower = VisionTransformer(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.width,
            layers=cfg.layers,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            act_layer=QuickGELU,
            pool_type="none",  # every token (class and patches) through ln_post, nothing pooled
        )
        self.tower.proj = None
        if cfg.weights:
            load_vision_weights(self.tower, cfg.weights)
        self.num_frozen_blocks = cfg.layers - cfg.trainable_blocks
        self.tower.requires_grad_(False)
        for block in self.tower.transformer.resblocks[self.num_frozen_blocks :]:
            block.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Autograd records nothing before the first trainable block (neither the images nor the
        # frozen weights need gradients), so the frozen part keeps no activations.
        return F.normalize(self.tower(images.to(self.tower.conv1.weight.dtype)), dim=-1)


def _read_state_dict(path: Path, shapes_only: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not shapes_only:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:  # the header alone: names and shapes
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    try:
        # Memory-mapped: a check of names and shapes reads none of the tensors' data.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
    except Exception:  # noqa: BLE001 - OpenAI's original release is TorchScript, not a pickled dict
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VisionWeightsError(f"vision weights {path}: expected a state dict, found {type(state).__name__}")
    return state


def _tower_state(path: Path, expected: dict[str, torch.Tensor], shapes_only: bool) -> dict[str, torch.Tensor]:
    """The tower's tensors from a full CLIP checkpoint (`visual.*` keys) or a vision-only state dict,
    checked against the configured tower's names and shapes."""
    if not path.is_file():
        raise VisionWeightsError(f"vision weights {path} do not exist")
    try:
        state = _read_state_dict(path, shapes_only)
    except VisionWeightsError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged file can fail anywhere in torch.load
        raise VisionWeightsError(f"vision weights {path} could not be read: {error}") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise VisionWeightsError(
            f"vision weights {path} lack {len(missing)} tower tensors, e.g. {', '.join(missing[:3])}"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise VisionWeightsError(
                f"vision weights {path}: {key} has shape {tuple(state[key].shape)}, "
                f"the configured tower needs {tuple(tensor.shape)}"
            )
    return {k: state[k] for k in expected}


def load_vision_weights(tower: VisionTransformer, weights: str | Path) -> None:
    """Load a tower from a full CLIP checkpoint (`visual.*` keys) or a vision-only state dict."""
    tower.load_state_dict(_tower_state(Path(weights), tower.state_dict(), shapes_only=False))


def check_vision_weights(cfg: VisionConfig) -> int:
    """Check that `cfg.weights` holds every tensor of the configured tower, in its shape, without
    reading the tensors where the format allows (safetensors, torch files); returns how many."""
    with torch.device("meta"):
        tower = VisionEncoder(dataclasses.replace(cfg, weights=None)).tower
    return len(_tower_state(Path(cfg.weights), tower.state_dict(), shapes_only=True))
