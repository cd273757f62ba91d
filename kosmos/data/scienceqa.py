"""ScienceQA for multimodal chain-of-thought fine-tuning: problems, prompts, and shards per stage.

The release layout: `problems.json` (problem id -> question, choices, answer index, hint, image,
subject, grade, lecture, solution, split, ...), `pid_splits.json` (split name -> problem ids) and
`images/{split}/{pid}/image.png`. Three ways of fine-tuning on it (Multimodal-CoT's formats):

  rationale  QCM -> R  `Question: ... Context: ... Options: (A) ... (B) ... Solution:` -> lecture and solution
  answer     QCMR -> A  the same, then `{rationale} Answer:` -> `The answer is (X).`
  direct     QCM -> A  `Question: ... Context: ... Options: ... Answer:` -> `The answer is (X).`

The problem's image, when it has one, comes first. Training shards and test-time prompts are both
laid out by `prompt_parts`, so a fine-tuned model meets at test time exactly the tokens it was
trained on. Shards are instruction corpora (only the target and `</s>` are learned) whose prompt is
stored in the interleaved layout, `{"texts": [...], "images": [...], "output": ...}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from kosmos.config import ConfigError
from kosmos.data.build import image_member
from kosmos.data.shards import CorpusIndex, CorpusWriter
from kosmos.data.skips import Reason, SkipSample

Stage = Literal["rationale", "answer", "direct"]
STAGES = get_args(Stage)
PROBLEMS_FILE = "problems.json"
PID_SPLITS_FILE = "pid_splits.json"
IMAGES_DIR = "images"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Multimodal-CoT's answer format; anything else is unparseable (and scored wrong, never guessed).
ANSWER = re.compile(r"The answer is \(([A-Z])\)")


@dataclass
class Problem:
    pid: str
    question: str
    choices: list[str]
    answer: int  # index into `choices`
    hint: str  # the text context, "" when there is none
    image: Path | None  # images/{split}/{pid}/{image}, None when the problem has no image
    lecture: str
    solution: str
    split: str
    # What the official breakdown groups by (subject, grade, hint, image) and a little more.
    meta: dict[str, Any]


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{what}: {path} is not valid JSON ({error})") from None


def _problem(pid: str, raw: Any, images: Path, where: str) -> Problem:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: problem {pid} is not a JSON object")

    def field(name: str, kind: type, optional: bool = False) -> Any:
        """A field of type `kind`; an optional text field may be missing or null (read as "")."""
        value = raw.get(name)
        if value is None and optional:
            return ""
        if not isinstance(value, kind):
            raise ConfigError(
                f"{where}: problem {pid} field {name!r} should be {kind.__name__}, got {value!r}"
            )
        return value

    choices = field("choices", list)
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ConfigError(f"{where}: problem {pid} needs at least two text choices, got {choices!r}")
    if len(choices) > len(LETTERS):
        raise ConfigError(f"{where}: problem {pid} has more choices than letters ({len(choices)})")
    answer = field("answer", int)
    if not 0 <= answer < len(choices):
        raise ConfigError(
            f"{where}: problem {pid} answer {answer} is not an index of its {len(choices)} choices"
        )
    split, image_name, hint = field("split", str), field("image", str, True), field("hint", str, True)
    return Problem(
        pid=pid,
        question=field("question", str),
        choices=list(choices),
        answer=answer,
        hint=hint,
        image=images / split / pid / image_name if image_name else None,
        lecture=field("lecture", str, True),
        solution=field("solution", str, True),
        split=split,
        meta={
            "subject": raw.get("subject"),
            "grade": raw.get("grade"),
            "hint": hint,
            "image": image_name or None,
            "topic": raw.get("topic"),
            "category": raw.get("category"),
        },
    )


def load_problems(
    problems_file: Path, images: Path, splits: list[str], pid_splits_file: Path | None = None
) -> list[Problem]:
    """The problems of `splits`, in order: as `pid_splits_file` lists them when given (it also names
    subsets such as `minival`), else those whose own `split` field is listed, in file order.

    Image files are not opened here: `missing_images` finds the absent ones.
    """
    problems = _read_json(problems_file, "problems")
    if not isinstance(problems, dict):
        raise ConfigError(f"problems: {problems_file} should map problem ids to problems")
    if pid_splits_file is None:
        pids = [
            pid
            for pid, p in problems.items()
            if not splits or (isinstance(p, dict) and p.get("split") in splits)
        ]
    else:
        listed = _read_json(pid_splits_file, "pid_splits")
        if not isinstance(listed, dict):
            raise ConfigError(f"pid_splits: {pid_splits_file} should map split names to problem ids")
        pids = []
        for split in splits:
            if split not in listed:
                raise ConfigError(
                    f"split: {split!r} is not in {pid_splits_file} (known: {', '.join(sorted(listed))})"
                )
            pids += [str(pid) for pid in listed[split]]
        unknown = [pid for pid in pids if pid not in problems]
        if unknown:
            raise ConfigError(
                f"pid_splits: {len(unknown)} problem id(s) of {pid_splits_file} are not in {problems_file}, "
                f"first: {unknown[0]}"
            )
    return [_problem(pid, problems[pid], images, str(problems_file)) for pid in pids]


def load_dataset(root: Path, split: str) -> list[Problem]:
    """The problems of one split of a ScienceQA folder in the release layout."""
    return load_problems(root / PROBLEMS_FILE, root / IMAGES_DIR, [split], root / PID_SPLITS_FILE)


def missing_images(problems: list[Problem]) -> list[Path]:
    return [p.image for p in problems if p.image is not None and not p.image.is_file()]


# --- prompts ---------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def options_text(choices: list[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {_one_line(c)}" for i, c in enumerate(choices))


def context_text(hint: str) -> str:
    return _one_line(hint) or "N/A"


def gold_rationale(problem: Problem) -> str:
    """The lecture then the solution, on one line ("" when the problem has neither)."""
    return _one_line(f"{problem.lecture} {problem.solution}")


def answer_text(answer: int) -> str:
    return f"The answer is ({LETTERS[answer]})."


def parse_answer(text: str, num_choices: int) -> int | None:
    """The option `The answer is (X).` names, or None when the text names none of the problem's."""
    match = ANSWER.search(text)
    if match is None:
        return None
    index = LETTERS.index(match.group(1))
    return index if index < num_choices else None


def prompt_parts(problem: Problem, stage: Stage, rationale: str | None = None) -> list[str | Path]:
    """The prompt of one stage: the image (a path) if the problem has one, then the text."""
    text = f"Question: {_one_line(problem.question)} Context: {context_text(problem.hint)} "
    text += f"Options: {options_text(problem.choices)}"
    if stage == "rationale":
        text += " Solution:"
    elif stage == "answer":
        if rationale is None:
            raise ValueError(f"problem {problem.pid}: the answer stage needs a rationale")
        text += f" Solution: {_one_line(rationale)} Answer:"
    elif stage == "direct":
        text += " Answer:"
    else:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    return ([problem.image] if problem.image is not None else []) + [text]


def target_text(problem: Problem, stage: Stage) -> str:
    return gold_rationale(problem) if stage == "rationale" else answer_text(problem.answer)


# --- rationales ------------------------------------------------------------------------------------


def read_rationales(path: Path) -> dict[str, str]:
    """Problem id -> rationale from JSON lines with `id` and `prediction` (what `kosmos mmcot
    rationales` and `kosmos eval` write); the last line of an id wins."""
    if not path.is_file():
        raise ConfigError(f"--rationales: {path} does not exist")
    rationales = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ConfigError(f"--rationales: {path} line {n} is not JSON ({error})") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("prediction"), str)
            or "id" not in record
        ):
            raise ConfigError(f"--rationales: {path} line {n} needs `id` and a text `prediction`")
        rationales[str(record["id"])] = record["prediction"]
    return rationales


def rationales_for(problems: list[Problem], rationales: dict[str, str], source: str) -> list[str]:
    """Each problem's rationale, looked up by problem id; every problem must have one."""
    missing = [p.pid for p in problems if p.pid not in rationales]
    if missing:
        raise ConfigError(
            f"--rationales: {source} has no rationale for {len(missing)} of {len(problems)} problems, "
            f"first: {missing[0]} (generate them with `kosmos mmcot rationales` on this split)"
        )
    return [rationales[p.pid] for p in problems]


# --- shards ----------------------------------------------------------------------------------------


def build_scienceqa(
    root: Path,
    split: str,
    stage: Stage,
    out: Path,
    rationales: Path | None = None,
    **shard_options,
) -> CorpusIndex:
    """An instruction corpus of one split for one stage.

    The answer stage reads the gold rationales (lecture and solution), or with `rationales` the
    stage-1 generations, joined by problem id. Problems whose image file is missing or not an image,
    or (rationale stage) that have neither lecture nor solution, are counted as skipped.
    """
    if stage not in STAGES:
        raise ConfigError(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
    if rationales is not None and stage != "answer":
        raise ConfigError("--rationales: only the answer stage reads rationales")
    problems = load_dataset(root, split)
    given = None
    if rationales is not None:
        given = rationales_for(problems, read_rationales(rationales), str(rationales))
    with CorpusWriter(out, "instruction", **shard_options) as writer:
        for n, problem in enumerate(problems):
            try:
                writer.write(_sample(problem, stage, given[n] if given is not None else None))
            except SkipSample as skip:
                writer.skip(skip.reason)
    return writer.index


def _sample(problem: Problem, stage: Stage, rationale: str | None) -> dict[str, bytes]:
    target = target_text(problem, stage)
    if not target:
        raise SkipSample(Reason.EMPTY_RATIONALE)
    if stage == "answer" and rationale is None:
        rationale = gold_rationale(problem)
    layout: dict[str, Any] = {"id": problem.pid, "texts": [], "images": [], "output": target}
    members = {}
    for part in prompt_parts(problem, stage, rationale):
        if isinstance(part, str):
            layout["texts"].append(part)
            layout["images"].append(None)
        else:
            extension, data = image_member(part)
            name = f"0.{extension}"
            layout["texts"].append(None)
            layout["images"].append(name)
            members[name] = data
    return {"json": json.dumps(layout).encode(), **members}
