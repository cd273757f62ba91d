"""Conversion to and from `transformers`: Kosmos-2 checkpoints and CLIP vision towers."""

from kosmos.convert.hf import (
    build_processor,
    checkpoint_to_hf,
    clip_from_hf,
    export_to_hf,
    hf_to_checkpoint,
    read_hf,
    save_checkpoint,
)
from kosmos.convert.mapping import (
    ConversionError,
    check_exportable,
    from_hf_config,
    from_hf_state_dict,
    to_hf_config,
    to_hf_state_dict,
)

__all__ = [
    "ConversionError",
    "build_processor",
    "check_exportable",
    "checkpoint_to_hf",
    "clip_from_hf",
    "export_to_hf",
    "from_hf_config",
    "from_hf_state_dict",
    "hf_to_checkpoint",
    "read_hf",
    "save_checkpoint",
    "to_hf_config",
    "to_hf_state_dict",
]
