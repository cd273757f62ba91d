"""Parameter counts (on the meta device, no weights allocated) and the FLOPs of training, for MFU.

MFU = achieved FLOP/s / peak FLOP/s. `training_flops` counts the FLOPs the model actually performs,
forward and backward (PaLM, appendix B, with its 6 FLOPs per weight and token):
- decoder layers: 6 * N_layers at every sequence position (padding and image slots cost the same);
- LM head: 6 * V * d at labelled positions only, since logits are computed only there;
- attention scores and weighted sums: 12 * L * d per query-key pair. Dense attention pairs every
  position with the whole row (T^2 per row of length T); an attention backend that computes each
  packed document on its own does sum(l^2) over the row's documents, which
  `document_attention_pairs` counts from the segment ids;
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
    `images` images, with `attention_pairs` query-key pairs (dense: rows x T^2, see
    `document_attention_pairs`); {"language": ..., "vision": ...}."""
    t = cfg.text
    per_layer = 4 * t.width * t.width + 2 * t.width * t.ffn_width  # attention + FFN weights
    language = (
        6.0 * t.layers * per_layer * positions
        + 6.0 * t.vocab_size * t.width * labelled
        + 12.0 * t.layers * t.width * attention_pairs
    )
    return {"language": language, "vision": images * vision_flops_per_image(cfg)}


def dense_attention_pairs(rows: float, seq_len: int) -> float:
    """Query-key pairs of attention over whole rows."""
    return rows * seq_len * seq_len


def document_attention_pairs(segment_ids: torch.Tensor) -> float:
    """Query-key pairs of attention computed per packed document: the sum of squared document
    lengths over the rows (`segment_ids` [rows, T], 0 for padding, which such backends skip)."""
    pairs = 0
    for row in segment_ids:
        lengths = torch.bincount(row[row > 0])
        pairs += int((lengths * lengths).sum())
    return float(pairs)


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
