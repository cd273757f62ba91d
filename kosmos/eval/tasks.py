"""Evaluation tasks: one YAML file per benchmark (the stock ones in `kosmos/configs/eval/`), validated
before any compute.

A task says where its data is and in which format, how a prompt is laid out, how the model answers
(generate text, rank text choices, or rank candidate images) and which metrics score it. Prompt
templates name image slots and text fields in braces: `{image}Question: {question} Answer:` puts the
image first, then the text. A new benchmark in a known format is a new file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kosmos import config as config_io
from kosmos.config import ConfigError
from kosmos.configs import packaged
from kosmos.eval.metrics import METRICS

KINDS = ("generate", "rank_choices", "rank_images")


@dataclass(frozen=True)
class FormatSpec:
    """What a data format needs in a split section, and the fields its samples offer to templates."""

    required: tuple[str, ...]
    images: tuple[str, ...]  # image slots of a sample
    text: tuple[str, ...]  # text fields of a sample


FORMATS = {
    "karpathy": FormatSpec(("annotations", "images"), ("image",), ()),
    "vqav2": FormatSpec(("questions", "annotations", "images", "image_pattern"), ("image",), ("question",)),
    "vizwiz": FormatSpec(("annotations", "images"), ("image",), ("question",)),
    "image_folder": FormatSpec(("images",), ("image",), ()),
    "scienceqa": FormatSpec(("annotations", "images"), ("image",), ("question", "hint", "options")),
    "rendered_sst2": FormatSpec(("annotations",), ("image",), ("sentence",)),
    "raven_index": FormatSpec(("annotations",), ("context", "candidate"), ("count",)),
    "raven_generated": FormatSpec((), ("context", "candidate"), ("count",)),
    "jsonl": FormatSpec(("annotations",), ("image",), ("question", "context")),
    "hateful_memes": FormatSpec(("annotations",), ("image",), ("text",)),
    "text_choices": FormatSpec(("annotations",), (), ("question", "item1", "item2", "object")),
}
# Filled in while prompting, available to every template.
PROMPT_FIELDS = {"query": (), "demo": ("answer",), "rationale": ()}
STAGE_TWO_FIELDS = ("rationale",)
FIELD = re.compile(r"\{(\w+)\}")


@dataclass
class SplitConfig:
    """One split's files, relative to the task's data root."""

    annotations: str | None = None
    questions: str | None = None
    images: str | None = None
    # File name of an image from its annotation fields, e.g. "COCO_val2014_{image_id:012d}.jpg".
    image_pattern: str | None = None
    # Split names to keep where one file holds several (Karpathy "test", ScienceQA "test").
    splits: list[str] = field(default_factory=list)
    # jsonl: a JSON list of class names that `label` indexes.
    classes: str | None = None
    # Generated data (raven_generated): how many items, from which seed, at which image size.
    count: int = 200
    seed: int = 0
    image_size: int = 160
    # raven_generated: candidates per puzzle (the paper's test has six).
    candidates: int = 6


@dataclass
class TaskDataConfig:
    """A task's `data:` section: where its samples are and in which format."""

    format: str
    eval: SplitConfig
    # Relative to the evaluation's --data-root unless absolute.
    root: str = "."
    # Where few-shot demonstrations come from (same format); none = the task runs zero-shot only.
    demos: SplitConfig | None = None


@dataclass
class PromptConfig:
    """Templates; `{image}`-style names are image slots, the rest text fields of the sample."""

    query: str
    # One demonstration; `{answer}` is the demonstration's answer. Default: the query then the answer.
    demo: str | None = None
    # Multimodal chain-of-thought stage 1 (e.g. "{image}Introduce this picture in detail:"); its output
    # fills `{rationale}` in the query.
    rationale: str | None = None
    # rank_images: the continuation whose likelihood ranks the candidates (Raven's "Yes").
    target: str | None = None

    def demo_template(self) -> str:
        return self.demo if self.demo is not None else self.query + " {answer}"


@dataclass
class DecodingConfig:
    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    num_beams: int = 5
    max_new_tokens: int = 20
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # Generated text is cut at the first of these (the model may run on into a next example).
    stop: list[str] = field(default_factory=lambda: ["\n"])
    rationale_max_new_tokens: int = 64
    # Rank choices by mean rather than summed token log-likelihood.
    length_normalize: bool = False


@dataclass
class TaskConfig:
    kind: Literal["generate", "rank_choices", "rank_images"]
    data: TaskDataConfig
    prompt: PromptConfig
    metrics: list[str]
    name: str = ""  # defaults to the file name
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # Sample metadata key that groups demonstrations for stratified selection (e.g. question_type).
    demo_group: str | None = None

    def validate(self, prefix: str) -> None:
        def key(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        if not self.metrics:
            raise ConfigError(f"{key('metrics')}: name at least one metric (known: {', '.join(METRICS)})")
        for i, metric in enumerate(self.metrics):
            if metric not in METRICS:
                raise ConfigError(
                    f"{key(f'metrics[{i}]')}: unknown metric {metric!r} (known: {', '.join(METRICS)})"
                )
        spec = FORMATS.get(self.data.format)
        if spec is None:
            raise ConfigError(
                f"{key('data.format')}: unknown format {self.data.format!r} (known: {', '.join(FORMATS)})"
            )
        for split_name in ("eval", "demos"):
            split = getattr(self.data, split_name)
            for required in spec.required if split is not None else ():
                if getattr(split, required) is None:
                    raise ConfigError(
                        f"{key(f'data.{split_name}.{required}')}: required by format {self.data.format}"
                    )
        if self.kind == "rank_images":
            if "candidate" not in spec.images:
                raise ConfigError(
                    f"{key('kind')}: rank_images needs candidate images; format {self.data.format} has none"
                )
            if not self.prompt.target:
                raise ConfigError(
                    f"{key('prompt.target')}: rank_images needs the continuation to score (e.g. Yes)"
                )
        known = set(spec.images) | set(spec.text)
        templates = {"query": self.prompt.query, "rationale": self.prompt.rationale}
        if self.data.demos is not None:
            templates["demo"] = self.prompt.demo_template()
        for name, template in templates.items():
            if template is None:
                continue
            allowed = known | set(PROMPT_FIELDS[name])
            if name == "query" and self.prompt.rationale is not None:
                allowed |= set(STAGE_TWO_FIELDS)
            for found in FIELD.findall(template):
                if found not in allowed:
                    raise ConfigError(
                        f"{key(f'prompt.{name}')}: unknown field {{{found}}} for format "
                        f"{self.data.format} (known: {', '.join(sorted(allowed))})"
                    )

    @property
    def few_shot(self) -> bool:
        return self.data.demos is not None


def task_path(name_or_path: str, task_dir: str | Path | None = None) -> Path:
    """A task file from its name (looked up in `task_dir`) or its path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"task file {candidate} does not exist")
        return candidate
    folder = Path(task_dir) if task_dir is not None else packaged("eval")
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ConfigError(f"unknown task {name_or_path!r}: no {path} (known: {', '.join(known) or 'none'})")
    return path


def load_task(
    name_or_path: str, task_dir: str | Path | None = None, overrides: list[str] | None = None
) -> TaskConfig:
    """Read and validate one task file; any error names the file and the key."""
    path = task_path(name_or_path, task_dir)
    try:
        task = config_io.load(TaskConfig, path, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not task.name:
        task.name = path.stem
    return task


def list_tasks(task_dir: str | Path | None = None) -> list[str]:
    folder = Path(task_dir) if task_dir is not None else packaged("eval")
    return sorted(p.stem for p in folder.glob("*.yaml"))
