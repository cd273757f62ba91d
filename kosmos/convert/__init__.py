"""Conversion to and from `transformers`: Kosmos-2 checkpoints and CLIP vision towers."""

from kosmos import lazy_exports

_MODULES = {
    "kosmos.convert.hf": [
        "build_processor",
        "checkpoint_to_hf",
        "clip_from_hf",
        "export_to_hf",
        "hf_to_checkpoint",
        "read_hf",
        "save_checkpoint",
    ],
    "kosmos.convert.mapping": [
        "ConversionError",
        "check_exportable",
        "from_hf_config",
        "from_hf_state_dict",
        "to_hf_config",
        "to_hf_state_dict",
    ],
}
__getattr__ = lazy_exports(__name__, _MODULES)
