"""KOSMOS-1-style multimodal language models: model, data, training, evaluation and export."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, modules: dict[str, list[str]]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports each exported name from its module on first use.

    `kosmos --help` imports every area's command-line module, and with it the area's package; names
    exported this way keep torch, DeepSpeed and open_clip out of that import.
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
