"""The configs kosmos reads itself, shipped inside the package so that an installed kosmos (a wheel,
`pip install .`) finds them as a checkout does: DeepSpeed's per ZeRO stage (`deepspeed/`) and the
stock evaluation tasks (`eval/`). Training and model YAML stay in the repository's `configs/`: they are
the user's to copy and edit, and are named by path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged(folder: str) -> Path:
    """One of the folders above. An installed package lies unpacked on the file system (pip never runs
    a wheel zipped), so the resource is a plain path that can be listed and globbed."""
    return Path(resources.files(__name__).joinpath(folder))
