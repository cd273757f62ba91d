"""Benchmark loaders: each data format read into the same `Sample` records.

Formats (the split section of a task file names the files):
- karpathy: Karpathy's `dataset_coco.json` / `dataset_flickr30k.json` (COCO and Flickr30k captions);
- vqav2: the VQA questions and annotations files plus an image folder;
- vizwiz: VizWiz's annotation list (human answers as they are, scored by VizWiz's rule);
- image_folder: one sub-folder of images per class, the folder name being the class name;
- scienceqa: ScienceQA's `problems.json` with `images/<split>/<id>/image.png`;
- rendered_sst2: SST-2 sentences (a `sentence<TAB>label` file) rendered to images here;
- raven_index: IQ50-layout puzzles: `index.json` listing context images (3, 4 or 8) and candidates;
- raven_generated: puzzles from our generator, made in memory;
- jsonl: one JSON object per line with `id`, `image` and any of `captions`, `question` + `answers`,
  `context` (text shown with the image, e.g. a web page's text for WebSRC), `label` (an index into
  the split's `classes` JSON list) and `split` (kept if listed in `splits`); the sample corpus's
  held-out digit sets (`kosmos data sample`, DIR/eval/) are in this format;
- hateful_memes: the Hateful Memes `*.jsonl` files (`id`, `img` relative to the data root, `label`
  1 for hateful, `text` the meme's caption), ranked "no" / "yes";
- text_choices: text-only multiple choice, one JSON object per line with `id`, `choices`, `answer`
  (an index into them) and the text fields its template names (`question`, `item1`, `item2`,
  `object`): RelativeSize, MemoryColor and ColorTerms.
Image files are checked to exist before any compute.
"""

from __future__ import annotations

import csv
import functools
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from kosmos.config import ConfigError
from kosmos.data.scienceqa import context_text, load_problems, options_text
from kosmos.eval import raven
from kosmos.eval.tasks import FORMATS, SplitConfig, TaskConfig

ImageRef = Path | Image.Image | Callable[[], Image.Image]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Sample:
    id: str
    images: dict[str, list[ImageRef]] = field(default_factory=dict)  # slot name -> images
    text: dict[str, str] = field(default_factory=dict)  # template fields
    references: list[str] = field(default_factory=list)  # reference captions or human answers
    choices: list[str] = field(default_factory=list)  # options to rank (classes, answers)
    answer: int | None = None  # index of the right choice (or candidate image)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The answer a demonstration shows: the right choice, else the most common reference."""
        if self.choices and self.answer is not None:
            return self.choices[self.answer]
        if not self.references:
            raise ValueError(f"sample {self.id} has no answer to show as a demonstration")
        return Counter(self.references).most_common(1)[0][0]


def load_image(ref: ImageRef) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if callable(ref):
        return ref().convert("RGB")
    with Image.open(ref) as image:
        return image.convert("RGB")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what}: {path} is not valid JSON ({error})") from None


# --- formats -------------------------------------------------------------------------------------------


def _karpathy(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    data = _read_json(root / split.annotations, f"{key}.annotations")
    images = root / split.images
    samples = []
    for item in data["images"]:
        if split.splits and item["split"] not in split.splits:
            continue
        path = images / item.get("filepath", "") / item["filename"]
        image_id = str(item.get("cocoid", item.get("imgid", item["filename"])))
        samples.append(Sample(image_id, {"image": [path]}, references=[s["raw"] for s in item["sentences"]]))
    return samples


def _vqav2(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    questions = _read_json(root / split.questions, f"{key}.questions")["questions"]
    annotations = {
        a["question_id"]: a for a in _read_json(root / split.annotations, f"{key}.annotations")["annotations"]
    }
    images = root / split.images
    samples = []
    for q in questions:
        a = annotations.get(q["question_id"])
        if a is None:
            raise ConfigError(f"{key}.annotations: no answers for question {q['question_id']}")
        path = images / split.image_pattern.format(image_id=q["image_id"])
        meta = {
            "question_type": a.get("question_type"),
            "answer_type": a.get("answer_type"),
            "image_id": q["image_id"],
        }
        samples.append(
            Sample(
                str(q["question_id"]),
                {"image": [path]},
                {"question": q["question"]},
                references=[x["answer"] for x in a["answers"]],
                meta=meta,
            )
        )
    return samples


def _vizwiz(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    items = _read_json(root / split.annotations, f"{key}.annotations")
    images = root / split.images
    samples = []
    for item in items:
        meta = {
            "answer_type": item.get("answer_type"),
            "answerable": item.get("answerable"),
            # VizWiz has no question types: the first words of the question stand in for stratified demos.
            "question_type": " ".join(item["question"].lower().split()[:2]),
        }
        samples.append(
            Sample(
                Path(item["image"]).stem,
                {"image": [images / item["image"]]},
                {"question": item["question"]},
                references=[a["answer"] for a in item["answers"]],
                meta=meta,
            )
        )
    return samples


def _image_folder(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    folder = root / split.images
    if not folder.is_dir():
        raise ConfigError(f"{key}.images: {folder} is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{key}.images: {folder} has no class sub-folders")
    names = [c.replace("_", " ") for c in classes]
    samples = []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(
                    Sample(
                        f"{name}/{path.stem}",
                        {"image": [path]},
                        choices=names,
                        answer=label,
                        meta={"class": names[label]},
                    )
                )
    return samples


def _scienceqa(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    problems = load_problems(root / split.annotations, root / split.images, split.splits)
    return [
        Sample(
            p.pid,
            {"image": [p.image] if p.image is not None else []},
            {"question": p.question, "hint": context_text(p.hint), "options": options_text(p.choices)},
            choices=list(p.choices),
            answer=p.answer,
            meta=p.meta,
        )
        for p in problems
    ]


SST2_CHOICES = ["negative", "positive"]


def read_sentence_labels(path: Path, key: str) -> list[tuple[str, int]]:
    """`sentence<TAB>label` lines (GLUE's SST-2 layout, header optional)."""
    if not path.is_file():
        raise ConfigError(f"{key}.annotations: {path} does not exist")
    rows = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if n == 1 and row[-1:] == ["label"]:
                continue
            if len(row) != 2 or row[1].strip() not in ("0", "1"):
                raise ConfigError(f"{key}.annotations: {path} line {n} is not 'sentence<TAB>0|1'")
            rows.append((row[0], int(row[1])))
    return rows


def render_text(text: str, size: int = 224, font_size: int = 20, margin: int = 8) -> Image.Image:
    """Black text on white, word-wrapped; the font shrinks until the text fits the square."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for points in range(font_size, 5, -1):
        font = ImageFont.load_default(size=points)
        lines, line = [], ""
        for word in text.split():
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) <= size - 2 * margin or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
        height = points * 1.25
        if len(lines) * height <= size - 2 * margin and all(
            draw.textlength(x, font=font) <= size - 2 * margin for x in lines
        ):
            break
    top = (size - len(lines) * height) / 2
    for i, line in enumerate(lines):
        draw.text((margin, top + i * height), line, fill="black", font=font)
    return image


def _rendered_sst2(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    rows = read_sentence_labels(root / split.annotations, key)
    return [
        Sample(
            str(i),
            {"image": [functools.partial(render_text, sentence, split.image_size)]},
            {"sentence": sentence},
            choices=SST2_CHOICES,
            answer=label,
            meta={"label": SST2_CHOICES[label]},
        )
        for i, (sentence, label) in enumerate(rows)
    ]


def _raven_sample(
    pid: str, context: list[ImageRef], candidates: list[ImageRef], answer: int, meta: dict | None = None
) -> Sample:
    if len(context) not in raven.COUNT_WORDS:
        raise ConfigError(f"puzzle {pid}: {len(context)} context images (3, 4 or 8 expected)")
    return Sample(
        pid,
        {"context": context, "candidate": candidates},
        {"count": raven.COUNT_WORDS[len(context)]},
        choices=[str(i) for i in range(len(candidates))],
        answer=answer,
        meta=meta or {},
    )


def _raven_index(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    index_path = root / split.annotations
    items = _read_json(index_path, f"{key}.annotations")
    folder = root / split.images if split.images else index_path.parent
    samples = []
    for item in items:
        if not 0 <= item["answer"] < len(item["candidates"]):
            raise ConfigError(
                f"{key}.annotations: puzzle {item['id']} answer {item['answer']} is not a candidate index"
            )
        samples.append(
            _raven_sample(
                str(item["id"]),
                [folder / p for p in item["context"]],
                [folder / p for p in item["candidates"]],
                int(item["answer"]),
            )
        )
    return samples


def _raven_generated(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    def panels(ps):
        return [functools.partial(raven.render_panel, p, split.image_size) for p in ps]

    try:
        raven.check_candidate_count(split.candidates)
    except ValueError as error:
        raise ConfigError(f"{key}.candidates: {error}") from None
    puzzles = raven.generate_puzzles(split.count, split.seed, split.candidates)
    # The baselines' choices travel with each sample so that they are scored on the same puzzles.
    return [
        _raven_sample(
            f"{split.seed}-{n:05d}",
            panels(p.context),
            panels(p.candidates),
            p.answer,
            {"baselines": raven.baseline_choices(p)},
        )
        for n, p in enumerate(puzzles)
    ]


def _jsonl_rows(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{key}.annotations: {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{key}.annotations: {path} line {n} is not JSON ({error})") from None
    return rows


def _jsonl(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    path = root / split.annotations
    images = root / split.images if split.images else path.parent
    classes = _read_json(root / split.classes, f"{key}.classes") if split.classes else None
    samples = []
    for row in _jsonl_rows(path, key):
        if split.splits and row.get("split") not in split.splits:
            continue
        sample = Sample(
            str(row["id"]),
            {"image": [images / row["image"]]},
            references=list(row.get("captions", row.get("answers", []))),
        )
        for name in ("question", "context"):
            if name in row:
                sample.text[name] = row[name]
        if "label" in row:
            if classes is None:
                raise ConfigError(f"{key}.classes: {path} has labels, so the class names file is needed")
            sample.choices, sample.answer = list(classes), int(row["label"])
            sample.meta["class"] = classes[sample.answer]
        samples.append(sample)
    return samples


HATEFUL_CHOICES = ["no", "yes"]


def _hateful_memes(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    images = root / split.images if split.images else root
    samples = []
    for row in _jsonl_rows(root / split.annotations, key):
        label = int(row["label"])
        if label not in (0, 1):
            raise ConfigError(f"{key}.annotations: meme {row['id']} has label {label} (0 or 1 expected)")
        samples.append(
            Sample(
                str(row["id"]),
                {"image": [images / row["img"]]},
                {"text": row["text"]},
                choices=HATEFUL_CHOICES,
                answer=label,
                meta={"label": HATEFUL_CHOICES[label]},
            )
        )
    return samples


def _text_choices(split: SplitConfig, root: Path, key: str) -> list[Sample]:
    samples = []
    for row in _jsonl_rows(root / split.annotations, key):
        choices, answer = list(row["choices"]), int(row["answer"])
        if not 0 <= answer < len(choices):
            raise ConfigError(f"{key}.annotations: item {row['id']} answer {answer} is not a choice index")
        fields = {k: row[k] for k in FORMATS["text_choices"].text if k in row}
        samples.append(Sample(str(row["id"]), {}, fields, choices=choices, answer=answer))
    return samples


LOADERS: dict[str, Callable[[SplitConfig, Path, str], list[Sample]]] = {
    "karpathy": _karpathy,
    "vqav2": _vqav2,
    "vizwiz": _vizwiz,
    "image_folder": _image_folder,
    "scienceqa": _scienceqa,
    "rendered_sst2": _rendered_sst2,
    "raven_index": _raven_index,
    "raven_generated": _raven_generated,
    "jsonl": _jsonl,
    "hateful_memes": _hateful_memes,
    "text_choices": _text_choices,
}
assert set(LOADERS) == set(FORMATS)


def data_root(task: TaskConfig, base: str | Path = ".") -> Path:
    root = Path(task.data.root)
    return root if root.is_absolute() else Path(base) / root


def check_images(samples: list[Sample], key: str) -> None:
    missing = [
        ref
        for s in samples
        for refs in s.images.values()
        for ref in refs
        if isinstance(ref, Path) and not ref.is_file()
    ]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} image file(s) missing, first: {missing[0]}")


def load_samples(task: TaskConfig, split: str = "eval", base: str | Path = ".") -> list[Sample]:
    """Samples of the task's `eval` or `demos` split, after checking every image file exists."""
    config = getattr(task.data, split)
    if config is None:
        raise ConfigError(f"data.{split}: the task has no {split} split")
    key = f"data.{split}"
    try:
        samples = LOADERS[task.data.format](config, data_root(task, base), key)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise ConfigError(f"{key}: the data is not in the {task.data.format} layout ({detail})") from None
    if not samples:
        raise ConfigError(f"{key}: no samples found (format {task.data.format})")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, n in Counter(ids).items() if n > 1)
        raise ConfigError(f"{key}: sample id {duplicate!r} appears more than once")
    check_images(samples, key)
    return samples
