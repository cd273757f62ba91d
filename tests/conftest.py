"""Shared fixtures: a SentencePiece tokenizer trained on Python's own documentation, tiny configs."""

from __future__ import annotations

import pydoc_data.topics
import shutil
from pathlib import Path

import pytest
import torch

from kosmos.data.sample import train_tokenizer
from kosmos.model import ModelConfig, load_model_config
from kosmos.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def clone_configs(folder: Path) -> Path:
    """The repository's `configs/` copied into `folder`, as a clone has it: the paths its recipes name
    relative to themselves (`../../sample/...`, `../../corpora/...`) are then `folder`'s."""
    shutil.copytree(REPO / "configs", folder / "configs")
    return folder / "configs"


def session_processes(session: int) -> list[int]:
    """The live processes of a session (a process started with start_new_session=True leads one)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(pydoc_data.topics.topics.values(), folder / "sp.model", 1000)


@pytest.fixture
def tiny_config(tokenizer) -> ModelConfig:
    return load_model_config(REPO / "configs/model/tiny.yaml", [f"text.vocab_size={tokenizer.vocab_size}"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
