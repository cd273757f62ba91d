"""What lmms-eval finds before it imports our model: the `lmms_eval.models` entry point's manifest
and the folder of our lmms-eval task files (`kosmos/configs/lmms/`).

This module imports nothing of lmms-eval at module level. lmms-eval reads its entry points while its
`lmms_eval.models` package initializes, which importing `kosmos.eval.lmms_model` itself starts: were the
manifest defined there, it would not exist yet, and `kosmos` would not be registered.

Run as a program, it prints the task folder, for `--include_path`:

    lmms-eval --model kosmos ... --include_path "$(python -m kosmos.eval.lmms_entry)"
"""

from __future__ import annotations

from pathlib import Path

# The lmms-eval task files of the KOSMOS-1 protocols (with their `utils.py`).
TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "lmms"


def manifest():
    """The entry point lmms-eval loads: where the `kosmos` model class is."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="kosmos", simple_class_path="kosmos.eval.lmms_model.KosmosLMMS")


if __name__ == "__main__":
    print(TASK_DIR)
