"""The KOSMOS-1 model: configuration, modules, decoding and FLOP accounting."""

from kosmos import lazy_exports

_MODULES = {
    "kosmos.model.config": [
        "ConnectorConfig",
        "ModelConfig",
        "TextConfig",
        "VisionConfig",
        "load_model_config",
    ],
    "kosmos.model.flops": ["attention_pairs", "parameter_counts", "training_flops", "vision_flops_per_image"],
    "kosmos.model.generation": ["generate", "inference_dtype", "pad_batch", "sequence_log_likelihood"],
    "kosmos.model.kosmos": ["KosmosModel", "KosmosOutput", "KVCache"],
    "kosmos.model.vision": ["VisionWeightsError", "check_vision_weights", "load_vision_weights"],
}
__getattr__ = lazy_exports(__name__, _MODULES)
