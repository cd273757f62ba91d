"""ScienceQA for multimodal chain-of-thought: the loader, the prompt of each stage, the shards, and
rationales joined to problems by id (for stage-2 shards and at test time)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kosmos import config as config_io
from kosmos.cli import main
from kosmos.config import ConfigError
from kosmos.data import CorpusConfig
from kosmos.data.decode import DECODERS
from kosmos.data.scienceqa import (
    answer_text,
    build_scienceqa,
    gold_rationale,
    load_dataset,
    parse_answer,
    prompt_parts,
    target_text,
)
from kosmos.data.shards import read_index, read_samples
from kosmos.data.stream import encode_document
from kosmos.eval.cache import CheckpointIdentity
from kosmos.eval.mmcot import answer_problems, generate_rationales, score_answers
from kosmos.tokenizer import IGNORE_INDEX

# Image with a hint, image without one, hint without an image, neither (hint null), and one whose
# image file is missing.
PROBLEMS = {
    "11": {
        "question": "Which animal is shown?",
        "choices": ["cat", "dog"],
        "answer": 1,
        "hint": "The animal is a pet.",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade2",
        "lecture": "Pets live\nwith people.",
        "solution": "The picture shows a dog.",
        "split": "train",
    },
    "12": {
        "question": "What colour is the square?",
        "choices": ["red", "green", "blue"],
        "answer": 0,
        "hint": "",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade8",
        "lecture": "",
        "solution": "The square is red.",
        "split": "train",
    },
    "13": {
        "question": "Which word is a verb?",
        "choices": ["run", "blue"],
        "answer": 0,
        "hint": "A verb names an action.",
        "image": None,
        "subject": "language science",
        "grade": "grade3",
        "lecture": "Verbs are action words.",
        "solution": "Run is an action.",
        "split": "train",
    },
    "14": {
        "question": "Which city is a capital?",
        "choices": ["Paris", "Lyon"],
        "answer": 0,
        "hint": None,
        "image": None,
        "subject": "social science",
        "grade": "grade10",
        "lecture": "",
        "solution": "",
        "split": "train",
    },
    "15": {
        "question": "Is the light on?",
        "choices": ["yes", "no"],
        "answer": 1,
        "hint": "",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade1",
        "lecture": "Lights glow.",
        "solution": "It is dark.",
        "split": "val",
    },
}
# pid_splits order, not problems.json order, is the split's order.
PID_SPLITS = {"train": ["13", "11", "14", "12"], "val": ["15"], "minitrain": ["12"]}


@pytest.fixture
def scienceqa(tmp_path) -> Path:
    root = tmp_path / "scienceqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    (root / "pid_splits.json").write_text(json.dumps(PID_SPLITS))
    for pid in ("11", "12"):  # 15's image is missing
        folder = root / "images" / "train" / pid
        folder.mkdir(parents=True)
        Image.new("RGB", (80, 80), "red").save(folder / "image.png")
    return root


def test_loader_reads_splits_fields_and_image_paths(scienceqa):
    problems = load_dataset(scienceqa, "train")
    assert [p.pid for p in problems] == PID_SPLITS["train"]
    by_pid = {p.pid: p for p in problems}
    assert by_pid["11"].image == scienceqa / "images/train/11/image.png"
    assert by_pid["13"].image is None and by_pid["14"].image is None
    assert by_pid["14"].hint == "" and by_pid["12"].choices == ["red", "green", "blue"]
    assert by_pid["11"].meta == {
        "subject": "natural science",
        "grade": "grade2",
        "hint": "The animal is a pet.",
        "image": "image.png",
        "topic": None,
        "category": None,
    }
    assert [p.pid for p in load_dataset(scienceqa, "minitrain")] == ["12"]
    with pytest.raises(ConfigError, match="'test' is not in"):
        load_dataset(scienceqa, "test")


def test_loader_names_the_bad_problem(scienceqa):
    broken = dict(PROBLEMS, **{"13": {**PROBLEMS["13"], "answer": 2}})
    (scienceqa / "problems.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="problem 13 answer 2"):
        load_dataset(scienceqa, "train")
    (scienceqa / "pid_splits.json").write_text(json.dumps({"train": ["11", "99"]}))
    with pytest.raises(ConfigError, match="first: 99"):
        load_dataset(scienceqa, "train")


def test_prompts_of_each_stage(scienceqa):
    by_pid = {p.pid: p for p in load_dataset(scienceqa, "train")}
    image = scienceqa / "images/train/11/image.png"
    question = "Question: Which animal is shown? Context: The animal is a pet. Options: (A) cat (B) dog"
    assert prompt_parts(by_pid["11"], "rationale") == [image, f"{question} Solution:"]
    assert prompt_parts(by_pid["11"], "answer", "Dogs bark.\nSo B.") == [
        image,
        f"{question} Solution: Dogs bark. So B. Answer:",
    ]
    assert prompt_parts(by_pid["11"], "direct") == [image, f"{question} Answer:"]
    assert target_text(by_pid["11"], "rationale") == "Pets live with people. The picture shows a dog."
    assert target_text(by_pid["11"], "answer") == target_text(by_pid["11"], "direct") == "The answer is (B)."
    # No image: text only; no hint: "N/A", as Multimodal-CoT writes an empty context.
    assert prompt_parts(by_pid["13"], "direct") == [
        "Question: Which word is a verb? Context: A verb names an action. Options: (A) run (B) blue Answer:"
    ]
    assert prompt_parts(by_pid["14"], "rationale") == [
        "Question: Which city is a capital? Context: N/A Options: (A) Paris (B) Lyon Solution:"
    ]
    assert prompt_parts(by_pid["12"], "rationale")[1].startswith(
        "Question: What colour is the square? Context: N/A"
    )
    assert gold_rationale(by_pid["12"]) == "The square is red." and gold_rationale(by_pid["14"]) == ""
    with pytest.raises(ValueError, match="needs a rationale"):
        prompt_parts(by_pid["11"], "answer")


def test_answer_parsing_never_guesses():
    assert parse_answer("The answer is (B).", 3) == 1
    assert parse_answer("Because of the lecture. The answer is (A). The answer is (C).", 3) == 0
    assert parse_answer("The answer is (D).", 3) is None  # not one of the options
    for text in ("B", "(B)", "the answer is b", ""):
        assert parse_answer(text, 3) is None
    assert answer_text(2) == "The answer is (C)."


def shard_documents(folder: Path, tokenizer) -> dict[str, tuple]:
    """pid -> (decoded document, encoded sequence) of every sample of a built corpus."""
    corpus = CorpusConfig(kind="instruction", path=str(folder), tokens_per_step=1)
    out = {}
    for shard in read_index(folder).shards:
        with open(folder / shard.name, "rb") as file:
            for raw in read_samples(file, shard.name):
                document = DECODERS["instruction"](raw, corpus)
                out[json.loads(raw.members["json"])["id"]] = (document, encode_document(document, tokenizer, 4))
    return out


@pytest.mark.parametrize("stage", ["rationale", "answer", "direct"])
def test_shards_learn_the_target_only_and_match_the_test_time_prompt(scienceqa, tmp_path, tokenizer, stage):
    index = build_scienceqa(scienceqa, "train", stage, tmp_path / stage)
    # 14 has neither lecture nor solution: nothing to learn as a rationale.
    assert index.skipped == ({"empty_rationale": 1} if stage == "rationale" else {})
    documents = shard_documents(tmp_path / stage, tokenizer)
    by_pid = {p.pid: p for p in load_dataset(scienceqa, "train")}
    assert set(documents) == set(by_pid) - ({"14"} if stage == "rationale" else set())
    for pid, (document, encoded) in documents.items():
        problem = by_pid[pid]
        rationale = gold_rationale(problem) if stage == "answer" else None
        prompt = prompt_parts(problem, stage, rationale)
        # The image first when there is one, then the prompt text, then the learned target.
        assert [isinstance(p, str) for p in document.parts] == [isinstance(p, str) for p in prompt] + [True]
        assert document.parts[-2] == prompt[-1] and document.parts[-1] == target_text(problem, stage)
        # At test time the model reads exactly the tokens it was trained on before its target.
        test_time = tokenizer.encode_interleaved(prompt, 4, eos=False)
        assert encoded.ids[: len(test_time)] == test_time.ids
        assert encoded.image_mask[: len(test_time)] == test_time.image_mask
        learned = [label for label in encoded.labels() if label != IGNORE_INDEX]
        assert learned == tokenizer.encode(target_text(problem, stage)) + [tokenizer.eos_id]


def test_missing_image_is_counted(scienceqa, tmp_path):
    pid_splits = dict(PID_SPLITS, val=["15"])
    (scienceqa / "pid_splits.json").write_text(json.dumps(pid_splits))
    index = build_scienceqa(scienceqa, "val", "direct", tmp_path / "val")
    assert index.num_samples == 0 and index.skipped == {"missing_image": 1}


def rationale_file(path: Path, rationales: dict[str, str], order: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": pid, "prediction": rationales[pid]}) + "\n" for pid in order))
    return path


def test_stage_two_shards_join_rationales_by_problem_id(scienceqa, tmp_path, tokenizer):
    rationales = {pid: f"Generated reasoning number {pid}." for pid in PID_SPLITS["train"]}
    order = list(reversed(PID_SPLITS["train"]))  # not the split's order
    path = rationale_file(tmp_path / "rationales.jsonl", rationales, order)
    assert main(["data", "build", "scienceqa", "--root", str(scienceqa), "--stage", "answer",
                 "--rationales", str(path), "--out", str(tmp_path / "answer")]) == 0  # fmt: skip
    documents = shard_documents(tmp_path / "answer", tokenizer)
    assert set(documents) == set(rationales)
    for pid, (document, _) in documents.items():
        assert document.parts[-2].endswith(f"Solution: {rationales[pid]} Answer:")
        others = [r for other, r in rationales.items() if other != pid]
        assert not any(r in document.parts[-2] for r in others)

    # A rationale missing for one problem stops the build and names the problem.
    del rationales["12"]
    path = rationale_file(tmp_path / "partial.jsonl", rationales, sorted(rationales))
    with pytest.raises(ConfigError, match="no rationale for 1 of 4 problems, first: 12"):
        build_scienceqa(scienceqa, "train", "answer", tmp_path / "partial", path)
    with pytest.raises(ConfigError, match="only the answer stage"):
        build_scienceqa(scienceqa, "train", "direct", tmp_path / "direct", path)


class ReadingBackend:
    """Answers with the letter its prompt's rationale names ("pick X"), or with nothing usable."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, decoding, max_new_tokens=None):
        self.prompts += prompts
        texts = []
        for prompt in prompts:
            text = prompt[-1]
            texts.append(f"The answer is ({text.split('pick ')[1][0]})." if "pick " in text else "no idea")
        return texts


def test_test_time_answers_read_each_problems_own_rationale(scienceqa, tmp_path):
    problems = load_dataset(scienceqa, "train")
    rationales = {"11": "Dogs bark, pick B", "12": "It is red, pick A", "13": "pick A", "14": "Unsure."}
    rng = random.Random(0)
    order = rng.sample(sorted(rationales), len(rationales))
    path = rationale_file(tmp_path / "rationales.jsonl", rationales, order)
    backend = ReadingBackend()
    records = answer_problems(backend, problems, tmp_path / "answers", None, path, batch_size=3)
    assert [r["id"] for r in records] == [p.pid for p in problems]
    for record, problem, prompt in zip(records, problems, backend.prompts):
        assert record["rationale"] == rationales[problem.pid]
        assert f"Solution: {rationales[problem.pid]} Answer:" in prompt[-1]
    assert {r["id"]: r["choice"] for r in records} == {"11": 1, "12": 0, "13": 0, "14": -1}

    scores = score_answers(records)
    assert scores["unparseable"] == 1 and scores["problems"] == 4
    assert scores["accuracy"] == 75.0  # the unparseable answer is wrong, not guessed
    assert scores["breakdown"]["social"] == 0.0 and scores["breakdown"]["language"] == 100.0
    assert scores["breakdown"]["no_context"] == 0.0 and scores["breakdown"]["has_image"] == 100.0

    # A rerun finds every answer cached; after one rationale changed, only its problem runs again.
    again = ReadingBackend()
    assert answer_problems(again, problems, tmp_path / "answers", None, path) == records
    assert again.prompts == []
    changed = rationale_file(tmp_path / "changed.jsonl", {**rationales, "14": "pick B"}, order)
    updated = answer_problems(again, problems, tmp_path / "answers", None, changed)
    assert len(again.prompts) == 1 and "pick B" in again.prompts[0][-1]
    assert {r["id"]: r["choice"] for r in updated} == {"11": 1, "12": 0, "13": 0, "14": 1}
    # Another checkpoint runs every problem again.
    other = ReadingBackend()
    answer_problems(other, problems, tmp_path / "answers", CheckpointIdentity("c", 7, "f" * 64), changed)
    assert len(other.prompts) == len(problems)


def test_rationales_are_recorded_by_problem_id(scienceqa, tmp_path):
    problems = load_dataset(scienceqa, "train")

    class Echo:
        def generate(self, prompts, decoding, max_new_tokens=None):
            return [f"about: {prompt[-1].split(' Context')[0]}" for prompt in prompts]

    records = generate_rationales(Echo(), problems, tmp_path / "rationales", None, batch_size=2)
    assert [r["id"] for r in records] == [p.pid for p in problems]
    for record, problem in zip(records, problems):
        assert record["prediction"] == f"about: Question: {problem.question}"
        assert record["references"] == ([gold_rationale(problem)] if gold_rationale(problem) else [])
    lines = (tmp_path / "rationales" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(problems)


def test_too_many_new_tokens_stop_before_the_model_loads(scienceqa, tmp_path, tokenizer, tiny_config, capsys):
    # A model config and tokenizer without weights: reading weights would fail with another message.
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    config_io.dump(tiny_config, checkpoint / "model.yaml")
    shutil.copy(tokenizer.model_file, checkpoint / "tokenizer.model")
    command = ["mmcot", "rationales", "--checkpoint", str(checkpoint), "--data", str(scienceqa)]
    command += ["--split", "train", "--out", str(tmp_path / "out")]
    positions = tiny_config.text.max_positions
    assert main(command) == 2  # the default, 512 new tokens, cannot follow any prompt in 512 positions
    error = capsys.readouterr().err
    assert "--max-new-tokens: 512 new tokens after the longest prompt" in error
    assert f"exceed the model's {positions} positions (at most " in error
    assert main([*command, "--max-new-tokens", "16"]) == 2  # fits: on to the weights, which are not there
    error = capsys.readouterr().err
    assert "--checkpoint:" in error and "--max-new-tokens" not in error
