"""Prompts as interleaved parts: text strings and images, in reading order.

A template such as `{image}Question: {question} Answer:` becomes `[<image>, "Question: ... Answer:"]`.
Few-shot prompts are the demonstrations (each through the task's demo template, with its answer)
followed by the query. Each demonstration ends with `DEMO_END`, laid out as `</s>` with the next
demonstration (or the query) starting as a new document with `<s>`: the layout of documents packed
into one training row, where every answer ends with `</s>`. So a demonstrated answer ends the way the
model ends a generated one, and generation stops at `</s>` instead of running on into another
example. Text around an image is stripped: the tokenizer starts every text part as a new word anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kosmos.config import ConfigError
from kosmos.eval.datasets import ImageRef, Sample
from kosmos.eval.tasks import FIELD, TaskConfig


class DemoEnd:
    """The end of a demonstration in a prompt (see the module docstring)."""

    def __repr__(self) -> str:
        return "DEMO_END"


DEMO_END = DemoEnd()
Part = str | ImageRef | DemoEnd
Prompt = list[Part]


def is_image(part: Part) -> bool:
    return not isinstance(part, (str, DemoEnd))


def fill(template: str, sample: Sample, extra: Mapping[str, str | list[ImageRef]] | None = None) -> Prompt:
    """The template's text and images for one sample; `extra` adds or replaces fields (text or images)."""
    extra = extra or {}
    parts: Prompt = []
    text = ""

    def flush() -> None:
        nonlocal text
        if text.strip():
            parts.append(text.strip())
        text = ""

    position = 0
    for match in FIELD.finditer(template):
        text += template[position : match.start()]
        name = match.group(1)
        value = extra[name] if name in extra else sample.images.get(name, sample.text.get(name))
        if value is None:
            raise ConfigError(f"template field {{{name}}} is not known for sample {sample.id}")
        if isinstance(value, str):
            text += value
        else:
            flush()
            parts.extend(value)
        position = match.end()
    text += template[position:]
    flush()
    return parts


def few_shot_prompt(
    task: TaskConfig,
    query: Sample,
    demos: Sequence[Sample],
    extra: Mapping[str, str | list[ImageRef]] | None = None,
) -> Prompt:
    parts: Prompt = []
    for demo in demos:
        parts.extend(fill(task.prompt.demo_template(), demo, {"answer": demo.target}))
        parts.append(DEMO_END)
    parts.extend(fill(task.prompt.query, query, extra))
    return parts
