"""kosmos as an lmms-eval model on the repository's KOSMOS-1 task files (local JSON data, nothing from a
hub): the same captions, answers and scores as `kosmos eval` on the same model and data.

Marked slow: importing lmms-eval alone takes tens of seconds, so the unit run never imports it."""

import json
import os
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from kosmos.config import ConfigError
from kosmos.eval.backend import ModelBackend
from kosmos.eval.datasets import Sample
from kosmos.eval.demos import ClipEmbedder, RandomDemos
from kosmos.eval.harness import EvalOptions, evaluate
from kosmos.eval.lmms_entry import TASK_DIR
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


@pytest.fixture(scope="module")
def retrieval_clip(tmp_path_factory):
    """A tiny random open_clip model registered under a name of its own, and its weights file."""
    open_clip = pytest.importorskip("open_clip")
    import torch

    folder = tmp_path_factory.mktemp("clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "TinyRetrievalCLIP.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "TinyRetrievalCLIP.json")
    torch.manual_seed(1)
    torch.save(open_clip.create_model("TinyRetrievalCLIP").state_dict(), folder / "clip.pt")
    return "TinyRetrievalCLIP", folder / "clip.pt"


def write_data(folder):
    """3 evaluation rows and a pool of 5 demonstrations, as captioning.jsonl and vqa.jsonl."""
    (folder / "images").mkdir()
    captions, questions = [], []
    for n in range(8):
        Image.new("RGB", (24, 24), (30 * n, 200 - 25 * n, 90 + 20 * (n % 3))).save(
            folder / "images" / f"{n}.png"
        )
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


@pytest.mark.parametrize(("shots", "demos"), [(0, "random"), (2, "random"), (2, "rices"), (2, "stratified")])
def test_lmms_eval_reproduces_kosmos_eval(
    lmms_model, retrieval_clip, shots, demos, tmp_path, monkeypatch, tokenizer, tiny_config
):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    write_data(tmp_path)
    backend = ModelBackend(KosmosModel(tiny_config).eval(), tokenizer, batch_size=3)
    clip, weights = retrieval_clip
    # A few-shot variant of a repository task file, as a user writes one.
    (tmp_path / "lmms_tasks").mkdir()
    options = {
        "shots": shots,
        "seed": 0,
        "demos": demos,
        "retrieval_clip": clip,
        "retrieval_weights": str(weights),
    }
    for name in ("kosmos_caption", "kosmos_vqa"):
        variant = {
            "include": str(TASK_DIR / f"{name}.yaml"),
            "task": f"{name}_{shots}shot_{demos}",
            "lmms_eval_specific_kwargs": {"default": options},
        }
        (tmp_path / "lmms_tasks" / f"{name}_{shots}shot_{demos}.yaml").write_text(json.dumps(variant))
    monkeypatch.chdir(tmp_path)  # the task files read their data from where lmms-eval runs
    out = simple_evaluate(
        model=lmms_model.KosmosLMMS(backend=backend),
        tasks=[f"kosmos_caption_{shots}shot_{demos}", f"kosmos_vqa_{shots}shot_{demos}"],
        task_manager=TaskManager(
            include_path=[str(TASK_DIR), str(tmp_path / "lmms_tasks")], include_defaults=False
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
        demos=demos,
        bootstrap_resamples=10,
    )
    embedder = ClipEmbedder(clip, weights) if demos != "random" else None
    ours = evaluate(backend, options, embedder=embedder)
    values = {(e["task"], e["metric"]): e["value"] for e in ours["summary"]}
    results = out["results"]
    caption, vqa = results[f"kosmos_caption_{shots}shot_{demos}"], results[f"kosmos_vqa_{shots}shot_{demos}"]
    assert caption["cider,none"] == pytest.approx(values[("cap", "cider")])
    assert caption["rouge_l,none"] == pytest.approx(values[("cap", "rouge_l")])
    assert vqa["vqa_accuracy,none"] == pytest.approx(values[("vqa", "vqa_accuracy")])
    run = "0shot" if shots == 0 else f"{demos}/{shots}shot_trial0"
    queries = {"cap": "<image>An image of", "vqa": "<image>Question: What digit is this? Answer:"}
    for task, name in (
        (f"kosmos_caption_{shots}shot_{demos}", "cap"),
        (f"kosmos_vqa_{shots}shot_{demos}", "vqa"),
    ):
        samples = {s["doc"]["id"]: s for s in out["samples"][task]}
        path = tmp_path / f"out/predictions/{name}/{run}/predictions.jsonl"
        records = [json.loads(line) for line in path.open()]
        assert {i: s["resps"][0][0] for i, s in samples.items()} == {
            r["id"]: r["prediction"] for r in records
        }
        assert len(records) == 3
        if shots:
            # The demonstrations kosmos eval chose, in its order, with their answers.
            shown = {"cap": "a digit {}", "vqa": "{}"}[name]
            for record in records:
                context = samples[record["id"]]["arguments"][0]
                demonstrations = [f"{queries[name]} {shown.format(d[1:])}</s>" for d in record["demos"]]
                assert context == "".join(demonstrations) + queries[name]
            if demos != "random":  # retrieval, not the random draw
                pool = RandomDemos([Sample(f"{name[0]}{n}") for n in range(3, 8)])
                drawn = [[f"{name[0]}{n + 3}" for n in pool.select(Sample(r["id"]), shots)] for r in records]
                assert drawn != [r["demos"] for r in records]


def test_retrieval_without_weights_stops_naming_the_file_and_option(lmms_model, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kosmos_lmms_utils", TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    write_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"vqa.jsonl \(lmms_eval_specific_kwargs demos: rices.*needs retrieval_weights"
    ):
        utils.vqa_text({"id": "q0", "question": "What digit is this?"}, {"shots": 2, "demos": "rices"})
    with pytest.raises(ConfigError, match="6 demonstrations asked for but the demo pool has 5"):
        utils.vqa_text({"id": "q0", "question": "What digit is this?"}, {"shots": 6})


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
