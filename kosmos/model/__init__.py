"""The KOSMOS-1 model: configuration, modules, decoding and FLOP accounting."""

from kosmos.model.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig, load_model_config
from kosmos.model.flops import language_flops_per_token, parameter_counts, vision_flops_per_image
from kosmos.model.generation import generate, pad_batch, sequence_log_likelihood
from kosmos.model.kosmos import KosmosModel, KosmosOutput, KVCache
from kosmos.model.vision import VisionWeightsError, check_vision_weights, load_vision_weights

__all__ = [
    "ConnectorConfig",
    "KVCache",
    "KosmosModel",
    "KosmosOutput",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "VisionWeightsError",
    "check_vision_weights",
    "generate",
    "language_flops_per_token",
    "load_model_config",
    "load_vision_weights",
    "pad_batch",
    "parameter_counts",
    "sequence_log_likelihood",
    "vision_flops_per_image",
]
