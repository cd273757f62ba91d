"""Model configuration: the language decoder, the CLIP vision tower and the connector between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kosmos import config as config_io
from kosmos.config import ConfigError


@dataclass
class TextConfig:
    vocab_size: int = 64007
    layers: int = 24
    width: int = 2048
    ffn_width: int = 8192
    heads: int = 32
    max_positions: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    # "sinusoidal" is the fairseq layout that Kosmos-2 and `transformers` use; "xpos" is the paper's
    # relative scheme and cannot be exported to stock `transformers`.
    positions: Literal["sinusoidal", "xpos"] = "sinusoidal"
    xpos_scale_base: int = 512
    layer_norm_eps: float = 1e-5

    def validate(self, prefix: str) -> None:
        if self.width % self.heads:
            raise ConfigError(f"{prefix}.heads: width {self.width} is not divisible by {self.heads} heads")
        if self.positions == "xpos" and (self.width // self.heads) % 2:
            raise ConfigError(f"{prefix}.positions: xpos needs an even head width")


@dataclass
class VisionConfig:
    """An open_clip ViT in the OpenAI layout (QuickGELU)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    # The last `trainable_blocks` transformer blocks train; everything else in the tower is frozen.
    trainable_blocks: int = 1
    # Local file with the tower's weights (open_clip / OpenAI CLIP checkpoint); none = random init.
    weights: str | None = field(default=None, metadata=config_io.PATH)

    def validate(self, prefix: str) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{prefix}.patch_size: {self.patch_size} does not divide {self.image_size}")
        if self.width % self.heads:
            raise ConfigError(f"{prefix}.heads: width {self.width} is not divisible by {self.heads} heads")
        if not 0 <= self.trainable_blocks <= self.layers:
            raise ConfigError(f"{prefix}.trainable_blocks: must be between 0 and {self.layers}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class ConnectorConfig:
    """Attentive pooling: `num_queries` learned queries attend over [dense(image tokens); queries]."""

    num_queries: int = 64


# The attention backends over packed rows, named here once (kosmos/model/attention.py describes them).
AttentionChoice = Literal["auto", "sdpa", "documents", "flex", "varlen", "flash"]


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    # Attention over packed rows (kosmos/model/attention.py): "auto" picks the fastest backend that
    # runs on the device, dtype and pass at hand.
    attention: AttentionChoice = "auto"


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    return config_io.load(ModelConfig, path, overrides)
