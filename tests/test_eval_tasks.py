import json

import pytest
import yaml
from PIL import Image

from kosmos.config import ConfigError
from kosmos.eval.datasets import load_image, load_samples, render_text
from kosmos.eval.harness import EvalOptions, prepare_tasks
from kosmos.eval.tasks import list_tasks, load_task


@pytest.mark.parametrize("name", list_tasks())
def test_shipped_task_files_validate(name):
    task = load_task(name)
    assert task.name == name and task.metrics


def write_task(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def image(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def caption_task(root):
    (root / "captions.json").write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filename": "a.png",
                        "split": "test",
                        "imgid": 1,
                        "sentences": [{"raw": "a red square"}, {"raw": "red"}],
                    },
                    {
                        "filename": "b.png",
                        "split": "train",
                        "imgid": 2,
                        "sentences": [{"raw": "a blue square"}],
                    },
                ]
            }
        )
    )
    image(root / "images" / "a.png")
    image(root / "images" / "b.png")
    return {
        "kind": "generate",
        "data": {
            "format": "karpathy",
            "root": str(root),
            "eval": {"annotations": "captions.json", "images": "images", "splits": ["test"]},
            "demos": {"annotations": "captions.json", "images": "images", "splits": ["train"]},
        },
        "prompt": {"query": "{image}An image of"},
        "metrics": ["cider"],
    }


def test_good_task_file_loads_samples(tmp_path):
    path = write_task(tmp_path / "mine.yaml", caption_task(tmp_path))
    task = load_task(str(path))
    assert task.name == "mine"
    [sample] = load_samples(task)
    assert sample.references == ["a red square", "red"] and sample.target == "a red square"
    [demo] = load_samples(task, "demos")
    assert demo.id == "2"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(metrics=["cider", "bleurt"]), r"metrics\[1\]: unknown metric 'bleurt'"),
        (lambda d: d.update(metrics=[]), "metrics: name at least one metric"),
        (lambda d: d.pop("prompt"), "prompt: required key is missing"),
        (lambda d: d["prompt"].pop("query"), "prompt.query: required key is missing"),
        (lambda d: d["data"]["eval"].pop("images"), "data.eval.images: required by format karpathy"),
        (lambda d: d["data"].update(format="coco"), "data.format: unknown format 'coco'"),
        (
            lambda d: d["prompt"].update(query="{image}{question}"),
            r"prompt.query: unknown field \{question\}",
        ),
        (lambda d: d.update(kind="rank_images"), "kind: rank_images needs candidate images"),
        (lambda d: d.update(decoding={"strategy": "nucleus"}), "decoding.strategy"),
        (lambda d: d.update(colour="red"), "colour: unknown key"),
    ],
)
def test_bad_task_files_name_file_and_key(tmp_path, edit, message):
    data = caption_task(tmp_path)
    edit(data)
    path = write_task(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=message) as error:
        load_task(str(path))
    assert str(path) in str(error.value)


def test_missing_images_fail_before_compute(tmp_path):
    path = write_task(tmp_path / "bad.yaml", caption_task(tmp_path))
    (tmp_path / "images" / "a.png").unlink()
    options = EvalOptions(tasks=[str(path)], out=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"bad.yaml: data.eval: 1 image file\(s\) missing, first: .*a.png"):
        prepare_tasks(options)


def test_unknown_task_name_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'cocoo'.*coco_karpathy"):
        load_task("cocoo")


def test_vqav2_and_vizwiz_formats(tmp_path):
    image(tmp_path / "val" / "COCO_val2014_000000000042.jpg")
    (tmp_path / "q.json").write_text(
        json.dumps({"questions": [{"image_id": 42, "question": "What colour?", "question_id": 7}]})
    )
    answers = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i}
        for i, a in enumerate(["red"] * 9 + ["pink"])
    ]
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "question_id": 7,
                        "image_id": 42,
                        "answers": answers,
                        "question_type": "what color",
                        "answer_type": "other",
                    }
                ]
            }
        )
    )
    task = load_task(
        "vqav2",
        overrides=[
            f"data.root={tmp_path}",
            "data.eval.questions=q.json",
            "data.eval.annotations=a.json",
            "data.eval.images=val",
        ],
    )
    [sample] = load_samples(task)
    assert sample.text["question"] == "What colour?" and sample.target == "red"
    assert sample.meta["question_type"] == "what color" and len(sample.references) == 10

    image(tmp_path / "vz" / "VizWiz_val_00000001.jpg")
    (tmp_path / "vz.json").write_text(
        json.dumps(
            [
                {
                    "image": "VizWiz_val_00000001.jpg",
                    "question": "What is this?",
                    "answerable": 0,
                    "answer_type": "unanswerable",
                    "answers": [{"answer": "unsuitable image", "answer_confidence": "yes"}] * 10,
                }
            ]
        )
    )
    task = load_task(
        "vizwiz", overrides=[f"data.root={tmp_path}", "data.eval.annotations=vz.json", "data.eval.images=vz"]
    )
    [sample] = load_samples(task)
    # Human answers as they are: VizWiz's own scoring compares with them unchanged.
    assert sample.references == ["unsuitable image"] * 10 and sample.meta["answer_type"] == "unanswerable"


def test_scienceqa_problems_json(tmp_path):
    problems = {
        "1": {
            "question": "Which is a mammal?",
            "choices": ["cat", "trout"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "task": "closed choice",
            "grade": "grade2",
            "subject": "natural science",
            "topic": "biology",
            "category": "c",
            "skill": "s",
            "lecture": "",
            "solution": "",
            "split": "test",
        },
        "2": {
            "question": "Which word is a noun?",
            "choices": ["run", "table", "blue"],
            "answer": 1,
            "hint": "Read.",
            "image": None,
            "task": "closed choice",
            "grade": "grade9",
            "subject": "language science",
            "topic": "grammar",
            "category": "c",
            "skill": "s",
            "lecture": "",
            "solution": "",
            "split": "test",
        },
        "3": {
            "question": "Skip me",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": None,
            "grade": "grade1",
            "subject": "social science",
            "split": "train",
        },
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    image(tmp_path / "images" / "test" / "1" / "image.png")
    task = load_task("scienceqa", overrides=[f"data.root={tmp_path}"])
    first, second = load_samples(task)
    assert len(first.images["image"]) == 1 and second.images["image"] == []
    assert second.text["options"] == "(A) run (B) table (C) blue" and second.target == "table"
    assert first.text["hint"] == "N/A" and second.meta["grade"] == "grade9"


def test_rendered_sst2_builds_images_from_text(tmp_path):
    (tmp_path / "dev.tsv").write_text(
        "sentence\tlabel\na gorgeous , witty film\t1\n" + " ".join(["dull"] * 80) + "\t0\n"
    )
    task = load_task("rendered_sst2", overrides=[f"data.root={tmp_path}", "data.eval.image_size=96"])
    first, second = load_samples(task)
    assert (first.answer, second.answer) == (1, 0) and first.choices == ["negative", "positive"]
    picture = load_image(first.images["image"][0])
    assert picture.size == (96, 96)
    assert min(picture.convert("L").getdata()) < 100  # there is dark text on the white page
    assert render_text("a gorgeous , witty film", 96).tobytes() == picture.tobytes()
    (tmp_path / "dev.tsv").write_text("no label here\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_samples(task)


def test_image_folder_classes(tmp_path):
    image(tmp_path / "test" / "golden_retriever" / "1.png")
    image(tmp_path / "test" / "tabby_cat" / "1.png")
    task = load_task("image_folder", overrides=[f"data.root={tmp_path}"])
    samples = load_samples(task)
    assert samples[0].choices == ["golden retriever", "tabby cat"]
    assert [s.target for s in samples] == ["golden retriever", "tabby cat"]


def test_annotations_in_another_layout_are_named(tmp_path):
    data = caption_task(tmp_path)
    (tmp_path / "captions.json").write_text(json.dumps({"images": [{"file": "a.png", "split": "test"}]}))
    with pytest.raises(
        ConfigError, match="data.eval: the data is not in the karpathy layout \\(missing field 'filename'\\)"
    ):
        load_samples(load_task(str(write_task(tmp_path / "t.yaml", data))))
