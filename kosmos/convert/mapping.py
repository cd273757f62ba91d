"""Our layout <-> `transformers`' Kosmos-2: configurations and parameter names.

The two layouts are the same network (docs/design.md, "The model"), so converting is renaming, plus splitting
(or fusing) open_clip's `in_proj` of each vision block into q/k/v projections. The vision names also
cover `transformers`' CLIP vision tower, whose parameters Kosmos-2 names the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from kosmos.model.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from kosmos.tokenizer import BOS, EOS, PAD


class ConversionError(ValueError):
    """A checkpoint or configuration that cannot be converted; the message says why."""


# Prefixes of our top-level modules -> prefixes in Kosmos2ForConditionalGeneration.
_TEXT_PREFIXES = (
    ("embed_tokens.", "text_model.model.embed_tokens."),
    ("layers.", "text_model.model.layers."),
    ("layer_norm.", "text_model.model.layer_norm."),
    ("connector.", "image_to_text_projection."),
)
_TIED = "lm_head.weight"  # tied to embed_tokens on both sides: never stored in the HF checkpoint
_OUR_VISION = "vision.tower."
_HF_VISION = "vision_model.model."

# open_clip VisionTransformer names -> CLIP/Kosmos-2 vision names (outside the blocks).
_VISION_NAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
# Inside block N: transformer.resblocks.N.<ours> <-> encoder.layers.N.<theirs> (in_proj handled apart).
_BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OUR_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_QKV = ("q_proj", "k_proj", "v_proj")


# ----------------------------------------------------------------------------------------------
# Configurations


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ConversionError for a configuration stock `transformers` cannot represent."""
    if cfg.text.positions != "sinusoidal":
        raise ConversionError(
            f"model.text.positions is {cfg.text.positions!r}: transformers' Kosmos-2 only has fairseq "
            "sinusoidal positions, so this model cannot be exported without changing its outputs"
        )
    mlp_width = cfg.vision.width * cfg.vision.mlp_ratio
    if mlp_width != int(mlp_width):
        raise ConversionError(f"model.vision.mlp_ratio {cfg.vision.mlp_ratio} gives a fractional MLP width")


def to_hf_config(cfg: ModelConfig):
    """The `Kosmos2Config` of a model with our configuration (checked with `check_exportable`)."""
    from transformers import Kosmos2Config

    check_exportable(cfg)
    text, vision = cfg.text, cfg.vision
    config = Kosmos2Config(
        text_config={
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_positions,
            "embed_dim": text.width,
            "layers": text.layers,
            "ffn_dim": text.ffn_width,
            "attention_heads": text.heads,
            "activation_function": "gelu",  # exact (erf) GELU, as ours
            "dropout": text.dropout,
            "attention_dropout": text.attention_dropout,
            "activation_dropout": text.activation_dropout,
            "layer_norm_eps": text.layer_norm_eps,
            "scale_embedding": True,
            "tie_word_embeddings": True,
            "bos_token_id": BOS,
            "pad_token_id": PAD,
            "eos_token_id": EOS,
        },
        vision_config={
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,  # open_clip's LayerNorm default
        },
        latent_query_num=cfg.connector.num_queries,
    )
    config.architectures = ["Kosmos2ForConditionalGeneration"]
    return config


def _require(name: str, value, wanted) -> None:
    if value != wanted:
        raise ConversionError(f"{name} is {value!r}; our model supports only {wanted!r}")


def from_hf_config(config) -> ModelConfig:
    """Our `ModelConfig` for a `Kosmos2Config`; ConversionError if our model cannot reproduce it."""
    text, vision = config.text_config, config.vision_config
    _require("text_config.activation_function", text.activation_function, "gelu")
    _require("text_config.scale_embedding", text.scale_embedding, True)
    _require("text_config.add_cross_attention", text.add_cross_attention, False)
    _require("text_config.pad_token_id", text.pad_token_id, PAD)
    _require("text_config.tie_word_embeddings", text.tie_word_embeddings, True)
    _require("vision_config.hidden_act", vision.hidden_act, "quick_gelu")
    _require("vision_config.num_channels", vision.num_channels, 3)
    _require("vision_config.layer_norm_eps", vision.layer_norm_eps, 1e-5)
    image_size, patch_size = vision.image_size, vision.patch_size
    if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
        raise ConversionError(
            "vision_config: only square images and patches given as one number are supported"
        )
    return ModelConfig(
        text=TextConfig(
            vocab_size=text.vocab_size,
            layers=text.layers,
            width=text.embed_dim,
            ffn_width=text.ffn_dim,
            heads=text.attention_heads,
            max_positions=text.max_position_embeddings,
            dropout=text.dropout,
            attention_dropout=text.attention_dropout,
            activation_dropout=text.activation_dropout,
            positions="sinusoidal",
            layer_norm_eps=text.layer_norm_eps,
        ),
        vision=VisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            width=vision.hidden_size,
            layers=vision.num_hidden_layers,
            heads=vision.num_attention_heads,
            mlp_ratio=vision.intermediate_size / vision.hidden_size,
        ),
        connector=ConnectorConfig(num_queries=config.latent_query_num),
    )


# ----------------------------------------------------------------------------------------------
# Parameter names


def open_clip_vision_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip VisionTransformer state dict (no `proj`) in CLIP/Kosmos-2 vision names."""
    out = {}
    for name, tensor in state.items():
        if name in _VISION_NAMES:
            out[_VISION_NAMES[name]] = tensor
            continue
        block = _OUR_BLOCK.fullmatch(name)
        if block is None:
            raise ConversionError(f"vision tower tensor {name!r} has no counterpart in transformers")
        index, rest = block.groups()
        prefix = f"encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for proj, part in zip(_QKV, tensor.chunk(3)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part.clone()
        elif rest in _BLOCK_NAMES:
            out[prefix + _BLOCK_NAMES[rest]] = tensor
        else:
            raise ConversionError(f"vision tower tensor {name!r} has no counterpart in transformers")
    return out


def hf_vision_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP/Kosmos-2 vision names (without their model prefix) in open_clip VisionTransformer names."""
    plain = {theirs: ours for ours, theirs in _VISION_NAMES.items()}
    block_names = {theirs: ours for ours, theirs in _BLOCK_NAMES.items()}
    out, qkv = {}, {}
    for name, tensor in state.items():
        if name in plain:
            out[plain[name]] = tensor
            continue
        block = _HF_BLOCK.fullmatch(name)
        if block is None:
            raise ConversionError(f"vision tensor {name!r} has no counterpart in our vision tower")
        index, rest = block.groups()
        prefix = f"transformer.resblocks.{index}."
        projection = re.fullmatch(r"self_attn\.([qkv]_proj)\.(weight|bias)", rest)
        if projection:
            proj, kind = projection.groups()
            qkv.setdefault((prefix, kind), {})[proj] = tensor
        elif rest in block_names:
            out[prefix + block_names[rest]] = tensor
        else:
            raise ConversionError(f"vision tensor {name!r} has no counterpart in our vision tower")
    for (prefix, kind), parts in qkv.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ConversionError(f"vision block {prefix!r} lacks self_attn.{missing[0]}.{kind}")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV])
    return out


def _rename(
    state: Mapping[str, torch.Tensor],
    tied: str,
    vision_prefix: str,
    prefixes: Sequence[tuple[str, str]],
    target: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(text tensors renamed by the first matching (from, to) prefix, vision tensors with
    `vision_prefix` removed); the tied head `tied` is left out."""
    text, vision = {}, {}
    for name, tensor in state.items():
        if name == tied:
            continue
        if name.startswith(vision_prefix):
            vision[name.removeprefix(vision_prefix)] = tensor
            continue
        for source, dest in prefixes:
            if name.startswith(source):
                text[dest + name.removeprefix(source)] = tensor
                break
        else:
            raise ConversionError(f"tensor {name!r} has no counterpart in {target}")
    return text, vision


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our model's state dict in `Kosmos2ForConditionalGeneration` names (the tied head left out)."""
    out, vision = _rename(state, _TIED, _OUR_VISION, _TEXT_PREFIXES, "transformers' Kosmos-2")
    out.update({_HF_VISION + k: v for k, v in open_clip_vision_to_hf(vision).items()})
    return out


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `Kosmos2ForConditionalGeneration` state dict in our names (with the tied head)."""
    head = state.get("text_model." + _TIED)
    embeddings = state.get(_TEXT_PREFIXES[0][1] + "weight")
    if head is not None and embeddings is not None and not torch.equal(head, embeddings):
        raise ConversionError("the checkpoint's LM head differs from its token embeddings; ours are tied")
    swapped = [(theirs, ours) for ours, theirs in _TEXT_PREFIXES]
    out, vision = _rename(state, "text_model." + _TIED, _HF_VISION, swapped, "our model")
    out.update({_OUR_VISION + k: v for k, v in hf_vision_to_open_clip(vision).items()})
    if "embed_tokens.weight" in out:
        out[_TIED] = out["embed_tokens.weight"]
    return out
