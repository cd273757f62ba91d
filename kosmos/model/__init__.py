"""The KOSMOS-1 model: configuration, modules, decoding and FLOP accounting."""

from kosmos.model.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig, load_model_config
from kosmos.model.flops import (
    attention_pairs,
    parameter_counts,
    training_flops,
    vision_flops_per_image,
)
from kosmos.model.generation import generate, pad_batch, sequence_log_likelihood
from kosmos.model.kosmos import KosmosModel, KosmosOutput, KVCache
from kosmos.model.vision import VisionWeightsError, load_vision_weights

__all__ = [
    "ConnectorConfig",
    "KVCache",
    "KosmosModel",
    "KosmosOutput",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "VisionWeightsError",
    "attention_pairs",
    "generate",
    "load_model_config",
    "load_vision_weights",
    "pad_batch",
    "parameter_counts",
    "sequence_log_likelihood",
    "training_flops",
    "vision_flops_per_image",
]
