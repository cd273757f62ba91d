"""Parameter counts (on the meta device, no weights allocated) and FLOP estimates for MFU.

MFU = achieved FLOP/s / peak FLOP/s, with the achieved FLOPs of one training step counted as
- language model: 6 * N + 12 * L * d * T per token (PaLM, appendix B): N the decoder's parameters
  including the tied embedding (the LM head matmul), the second term the attention scores and
  weighted sums over a context of T, forward and backward;
- vision: per image, the tower's forward (2 FLOPs per multiply-add over its weights and attention),
  plus the backward (2x forward) of the trainable blocks and the connector only.
"""

from __future__ import annotations

import dataclasses

import torch

from kosmos.model.config import ModelConfig


def _count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    from kosmos.model.kosmos import KosmosModel

    meta_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, weights=None))
    with torch.device("meta"):
        model = KosmosModel(meta_cfg)
    vision = model.vision
    language = _count(model) - _count(vision) - _count(model.connector)
    return {
        "total": _count(model),
        "trainable": _count(model, trainable_only=True),
        "language": language,
        "vision": _count(vision),
        "vision_trainable": _count(vision, trainable_only=True),
        "connector": _count(model.connector),
    }


def language_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    t = cfg.text
    per_layer = 4 * t.width * t.width + 2 * t.width * t.ffn_width  # attention + FFN weights
    n = t.layers * per_layer + t.vocab_size * t.width
    return 6.0 * n + 12.0 * t.layers * t.width * seq_len


def vision_flops_per_image(cfg: ModelConfig) -> float:
    v = cfg.vision
    tokens = v.num_tokens
    mlp = int(v.width * v.mlp_ratio)
    block_forward = 2 * tokens * (4 * v.width * v.width + 2 * v.width * mlp) + 4 * tokens * tokens * v.width
    patches = 2 * (tokens - 1) * 3 * v.patch_size**2 * v.width
    width, queries = cfg.text.width, cfg.connector.num_queries
    connector_forward = 2 * tokens * v.width * width + 2 * (queries + tokens + queries) * 2 * width * width
    forward = patches + v.layers * block_forward + connector_forward
    backward = 2 * (v.trainable_blocks * block_forward + connector_forward)
    return float(forward + backward)
