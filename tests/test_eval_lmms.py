"""kosmos as an lmms-eval model on the repository's KOSMOS-1 task files (local JSON data, nothing from a
hub): the same captions, answers and scores as `kosmos eval` on the same model and data.

Marked slow: importing lmms-eval alone takes tens of seconds, so the unit run never imports it."""

import json
import os
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from kosmos.eval.backend import ModelBackend
from kosmos.eval.harness import EvalOptions, evaluate
from kosmos.eval.prompts import DEMO_END
from kosmos.model import KosmosModel

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lmms_model():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lmms_eval")
    from kosmos.eval import lmms_model

    return lmms_model


def write_data(folder):
    (folder / "images").mkdir()
    captions, questions = [], []
    for n in range(5):
        Image.new("RGB", (24, 24), (60 * n, 200 - 40 * n, 90)).save(folder / "images" / f"{n}.png")
        split = "demo" if n >= 3 else "test"
        captions.append(
            {"id": f"c{n}", "image": f"images/{n}.png", "split": split, "captions": [f"a digit {n}"] * 3}
        )
        questions.append(
            {
                "id": f"q{n}",
                "image": f"images/{n}.png",
                "split": split,
                "question": "What digit is this?",
                "answers": [str(n)] * 6 + ["none"] * 4,
            }
        )
    for name, rows in (("captioning.jsonl", captions), ("vqa.jsonl", questions)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def kosmos_task(folder, name, annotations, query, decoding, metrics):
    task = {
        "kind": "generate",
        "data": {
            "format": "jsonl",
            "root": str(folder),
            "eval": {"annotations": annotations, "splits": ["test"]},
            "demos": {"annotations": annotations, "splits": ["demo"]},
        },
        "prompt": {"query": query},
        "decoding": decoding,
        "metrics": metrics,
    }
    (folder / "tasks" / f"{name}.yaml").write_text(json.dumps(task))


@pytest.mark.parametrize("shots", [0, 2])
def test_lmms_eval_reproduces_kosmos_eval(lmms_model, shots, tmp_path, monkeypatch, tokenizer, tiny_config):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    write_data(tmp_path)
    backend = ModelBackend(KosmosModel(tiny_config).eval(), tokenizer, batch_size=3)
    # A few-shot variant of a repository task file, as a user writes one.
    (tmp_path / "lmms_tasks").mkdir()
    for name in ("kosmos_caption", "kosmos_vqa"):
        variant = {
            "include": str(lmms_model.TASK_DIR / f"{name}.yaml"),
            "task": f"{name}_{shots}shot",
            "lmms_eval_specific_kwargs": {"default": {"shots": shots, "seed": 0}},
        }
        (tmp_path / "lmms_tasks" / f"{name}_{shots}shot.yaml").write_text(json.dumps(variant))
    monkeypatch.chdir(tmp_path)  # the task files read their data from where lmms-eval runs
    out = simple_evaluate(
        model=lmms_model.KosmosLMMS(backend=backend),
        tasks=[f"kosmos_caption_{shots}shot", f"kosmos_vqa_{shots}shot"],
        task_manager=TaskManager(
            include_path=[str(lmms_model.TASK_DIR), str(tmp_path / "lmms_tasks")], include_defaults=False
        ),
        gen_kwargs="max_new_tokens=6",
        bootstrap_iters=0,
        log_samples=True,
    )
    (tmp_path / "tasks").mkdir()
    beam = {"strategy": "beam", "num_beams": 5, "max_new_tokens": 6}
    kosmos_task(tmp_path, "cap", "captioning.jsonl", "{image}An image of", beam, ["cider", "rouge_l"])
    greedy = {"strategy": "greedy", "max_new_tokens": 6}
    kosmos_task(tmp_path, "vqa", "vqa.jsonl", "{image}Question: {question} Answer:", greedy, ["vqa_accuracy"])
    options = EvalOptions(
        tasks=["cap", "vqa"],
        out=tmp_path / "out",
        task_dir=tmp_path / "tasks",
        shots=[shots],
        demos="random",
        bootstrap_resamples=10,
    )
    ours = evaluate(backend, options)
    values = {(e["task"], e["metric"]): e["value"] for e in ours["summary"]}
    results = out["results"]
    caption, vqa = results[f"kosmos_caption_{shots}shot"], results[f"kosmos_vqa_{shots}shot"]
    assert caption["cider,none"] == pytest.approx(values[("cap", "cider")])
    assert caption["rouge_l,none"] == pytest.approx(values[("cap", "rouge_l")])
    assert vqa["vqa_accuracy,none"] == pytest.approx(values[("vqa", "vqa_accuracy")])
    run = "0shot" if shots == 0 else f"random/{shots}shot_trial0"
    for task, name in ((f"kosmos_caption_{shots}shot", "cap"), (f"kosmos_vqa_{shots}shot", "vqa")):
        predictions = {s["doc"]["id"]: s["resps"][0][0] for s in out["samples"][task]}
        path = tmp_path / f"out/predictions/{name}/{run}/predictions.jsonl"
        records = [json.loads(line) for line in path.open()]
        assert predictions == {r["id"]: r["prediction"] for r in records} and len(records) == 3
        if shots:
            prompt = next(s for s in out["samples"][task] if s["doc"]["id"] == records[0]["id"])["arguments"]
            assert str(prompt).count("</s>") == shots
            # The demonstrations kosmos eval chose, with their answers.
            shown = {"cap": "An image of a digit {}</s>", "vqa": "Answer: {}</s>"}[name]
            assert all(shown.format(d[1:]) in str(prompt) for d in records[0]["demos"])


def test_log_likelihood_with_images_equals_the_backends(lmms_model, tokenizer, tiny_config):
    backend = ModelBackend(KosmosModel(tiny_config).eval(), tokenizer, batch_size=2)
    model = lmms_model.KosmosLMMS(backend=backend)
    picture = Image.new("RGB", (20, 20), "red")
    model.task_dict = {"t": {"test": [{"image": picture}]}}

    class Request:
        args = ("Is it red? Answer:", " yes", lambda doc: [doc["image"]], 0, "t", "test")

    [(score, greedy)] = model.loglikelihood([Request()])
    assert score == pytest.approx(
        backend.log_likelihood([[picture, "Is it red? Answer:"]], [" yes"])[0], abs=1e-4
    )
    assert isinstance(greedy, bool)


def test_contexts_interleave_images_and_demonstrations(lmms_model):
    a, b, c = object(), object(), object()
    assert lmms_model.interleave("An image of", [a]) == [a, "An image of"]
    assert lmms_model.interleave("<image>An image of a cat</s><image>An image of", [a, b]) == [
        a,
        "An image of a cat",
        DEMO_END,
        b,
        "An image of",
    ]
    assert lmms_model.interleave("Left <image> and right <image> differ?", [a, b]) == [
        "Left",
        a,
        "and right",
        b,
        "differ?",
    ]
    with pytest.raises(ValueError, match="marks 2 images but the document has 3"):
        lmms_model.interleave("<image><image>", [a, b, c])


def test_decoding_follows_the_generation_settings(lmms_model):
    beam = lmms_model.decoding_of({"num_beams": 5, "max_new_tokens": 30, "until": ["\n"]})
    assert (beam.strategy, beam.num_beams, beam.max_new_tokens, beam.stop) == ("beam", 5, 30, ["\n"])
    greedy = lmms_model.decoding_of({"until": "Q:", "temperature": 0, "do_sample": False})
    assert (greedy.strategy, greedy.stop) == ("greedy", ["Q:"])


def test_the_entry_point_registers_the_model(lmms_model, monkeypatch, tokenizer, tiny_config):
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "lmms_eval.models"
    ]
    module, function = entry["kosmos"].split(":")
    manifest = getattr(__import__(module, fromlist=[function]), function)()
    MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)  # what an installed kosmos does
    assert get_model("kosmos") is lmms_model.KosmosLMMS
    # `--model_args checkpoint=...` loads through the harness loader; `--batch_size auto` means 8.
    model = KosmosModel(tiny_config).eval()
    monkeypatch.setattr(
        "kosmos.eval.backend.load_for_eval", lambda path, device: (model, tokenizer, tiny_config)
    )
    made = get_model("kosmos").create_from_arg_string(
        "checkpoint=runs/tiny", {"batch_size": "auto", "device": "cpu"}
    )
    assert made.backend.model is model and made.backend.batch_size == 8
