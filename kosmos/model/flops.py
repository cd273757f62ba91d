"""Parameter counts (on the meta device, no weights allocated) and the FLOPs of training, for MFU.

MFU = achieved FLOP/s / peak FLOP/s. `training_flops` counts the FLOPs the model actually performs,
forward and backward (PaLM, appendix B, with its 6 FLOPs per weight and token):
- decoder layers: 6 * N_layers at every sequence position (padding and image slots cost the same);
- LM head: 6 * V * d at labelled positions only, since logits are computed only there;
- attention scores and weighted sums: 12 * L * d per query-key pair. Dense attention pairs every
  position with the whole row (T^2 per row of length T); an attention backend that computes each
  packed document on its own (flash-attn's varlen path) does sum(l^2) over the row's documents;
  `attention_pairs` counts either from the segment ids;
- vision: per image, the tower's forward (2 FLOPs per multiply-add over its weights and attention),
  plus the backward (2x forward) of the trainable blocks and the connector only.
The training logs (`metrics.jsonl`) and `kosmos bench train` both take their MFU from it.
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


def training_flops(
    cfg: ModelConfig,
    positions: float,
    labelled: float,
    images: float,
    attention_pairs: float,
) -> dict[str, float]:
    """FLOPs of training on `positions` sequence positions of which `labelled` are learned, holding
    `images` images, with `attention_pairs` query-key pairs (summed `attention_pairs` of the rows);
    {"language": ..., "vision": ...}."""
    t = cfg.text
    per_layer = 4 * t.width * t.width + 2 * t.width * t.ffn_width  # attention + FFN weights
    language = (
        6.0 * t.layers * per_layer * positions
        + 6.0 * t.vocab_size * t.width * labelled
        + 12.0 * t.layers * t.width * attention_pairs
    )
    return {"language": language, "vision": images * vision_flops_per_image(cfg)}


def attention_pairs(segment_ids: torch.Tensor, per_document: bool = False) -> torch.Tensor:
    """Query-key pairs of attention in each row ([rows], float64): the row length squared where
    attention spans whole rows, or with `per_document` (a backend that computes each packed document
    on its own, skipping padding) the sum of the squared lengths of the row's documents, the runs of
    `segment_ids` above 0."""
    rows, length = segment_ids.shape
    if not per_document:
        return torch.full((rows,), float(length * length), dtype=torch.float64, device=segment_ids.device)
    segments = segment_ids.long()
    width = int(segments.max()) + 1 if segments.numel() else 1
    flat = (segments + width * torch.arange(rows, device=segments.device)[:, None])[segments > 0]
    lengths = torch.bincount(flat, minlength=rows * width).view(rows, width).double()
    return (lengths * lengths).sum(1)


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
