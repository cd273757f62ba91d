"""What decides a prediction, hashed: the prediction cache's keys, checkpoint and data-file identities.

A prediction depends on the weights, the task's prompt templates and decoding settings, and the
query's and its demonstrations' inputs (text fields, image contents, options, the answers shown).
Each record carries the hash of all of these (`key`); a rerun into the same output folder reuses a
record only when its key is unchanged, so training further, editing an annotation or a template
re-runs exactly the samples affected. The path a checkpoint was given by plays no part: a checkpoint
is its step and the hash of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from kosmos.config import to_dict
from kosmos.eval.datasets import ImageRef, Sample, data_root, load_image
from kosmos.eval.prompts import is_image
from kosmos.eval.tasks import TaskConfig

_STEP_TAG = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CheckpointIdentity:
    path: str  # the checkpoint folder, resolved (for the reader; not part of the key)
    step: int | None  # from the folder's step_N name; None for a folder named otherwise
    sha256: str  # of the weights: every tensor's name, dtype, shape and bytes

    @property
    def key(self) -> dict:
        return {"step": self.step, "sha256": self.sha256}

    def as_dict(self) -> dict:
        return asdict(self)


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def checkpoint_identity(path: str | Path, model: torch.nn.Module) -> CheckpointIdentity:
    """The identity of the checkpoint `path` resolves to (a run folder: its latest), loaded as `model`."""
    from kosmos.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(path).resolve()
    match = _STEP_TAG.match(folder.name)
    return CheckpointIdentity(
        str(folder), int(match.group(1)) if match else None, weights_sha256(model.state_dict())
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(task: TaskConfig, base: str | Path) -> dict[str, dict]:
    """The task's data files (annotations, questions, class lists) by config key, with content hashes."""
    root = data_root(task, base)
    files = {}
    for split_name in ("eval", "demos"):
        split = getattr(task.data, split_name)
        for field_name in ("annotations", "questions", "classes"):
            name = getattr(split, field_name, None) if split is not None else None
            if name is not None and (root / name).is_file():
                files[f"data.{split_name}.{field_name}"] = {
                    "path": str((root / name).resolve()),
                    "sha256": file_sha256(root / name),
                }
    return files


class ImageHashes:
    """Content hashes of images, each computed once: file bytes, or the pixels of an in-memory image."""

    def __init__(self):
        self._known: dict = {}

    def __call__(self, ref: ImageRef) -> str:
        key = os.fspath(ref) if isinstance(ref, Path) else id(ref)
        if key not in self._known:
            if isinstance(ref, Path):
                digest = file_sha256(ref)
            else:
                image = ref if isinstance(ref, Image.Image) else load_image(ref)
                digest = hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
            self._known[key] = (ref, digest)  # the ref is kept so its id is not reused
        return self._known[key][1]


def prediction_key(context: dict, inputs: object) -> str:
    """The hash of what decides one prediction: `context` (checkpoint, settings) and `inputs`, both
    JSON."""
    text = json.dumps(context, sort_keys=True) + json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def describe_prompt(prompt: Sequence, images: ImageHashes) -> list:
    """A prompt's parts as JSON: text as it is, images by content hash, other markers by name."""
    return [{"image": images(p)} if is_image(p) else p if isinstance(p, str) else repr(p) for p in prompt]


class PredictionKeys:
    """The key of one sample's prediction in one run (task, checkpoint and demonstrations fixed)."""

    def __init__(self, task: TaskConfig, checkpoint: CheckpointIdentity | None, images: ImageHashes):
        self.images = images
        self.context = {
            "checkpoint": checkpoint.key if checkpoint is not None else None,
            "kind": task.kind,
            "prompt": to_dict(task.prompt),
            "decoding": to_dict(task.decoding),
        }

    def _inputs(self, sample: Sample) -> dict:
        return {
            "text": sample.text,
            "images": {slot: [self.images(r) for r in refs] for slot, refs in sorted(sample.images.items())},
            "choices": sample.choices,
        }

    def __call__(self, sample: Sample, demos: Sequence[Sample]) -> str:
        described = {
            "query": self._inputs(sample),
            "demos": [{**self._inputs(d), "answer": d.target} for d in demos],
        }
        return prediction_key(self.context, described)


class PredictionCache:
    """The predictions of one run, one JSON record per line, appended batch by batch (a later line for
    the same sample replaces an earlier one); `rewrite` keeps only the current records."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "predictions.jsonl"

    def read(self) -> dict[str, dict]:
        records = {}
        if self.path.is_file():
            with self.path.open() as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by an interruption: that sample runs again
                    records[record["id"]] = record
        return records

    def append(self, records: Sequence[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Sequence[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.path)
