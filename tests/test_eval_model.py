"""The harness around a real (tiny, random) model: prompts laid out, images transformed, scores wired."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from kosmos.config import ConfigError
from kosmos.data import image_transform
from kosmos.eval.backend import ModelBackend, load_for_eval
from kosmos.eval.harness import EvalOptions, evaluate
from kosmos.eval.prompts import DEMO_END
from kosmos.eval.tasks import DecodingConfig
from kosmos.model import KosmosModel

IMAGE = object()  # stands for one image in encode_interleaved


@pytest.fixture
def backend(tokenizer, tiny_config):
    return ModelBackend(KosmosModel(tiny_config).eval(), tokenizer, batch_size=2)


def picture(colour):
    return Image.new("RGB", (40, 30), colour)


def test_log_likelihood_is_the_continuation_log_probability(backend, tokenizer, tiny_config):
    prompt = ["Here are three images:", picture("red"), picture("blue"), "Is it correct?"]
    [score] = backend.log_likelihood([prompt], ["Yes"])
    # By hand: the prompt and continuation laid out, one forward pass, log-softmax at the answer tokens.
    prefix = tokenizer.encode_interleaved(prompt, tiny_config.connector.num_queries, bos=True, eos=False)
    answer = tokenizer.encode("Yes")
    transform = image_transform(tiny_config.vision.image_size)
    images = torch.stack([transform(picture("red")), transform(picture("blue"))])
    ids = torch.tensor([prefix.ids + answer])
    mask = torch.tensor([prefix.image_mask + [False] * len(answer)])
    with torch.no_grad():
        logits = backend.model(ids, image_mask=mask, images=images).logits[0].log_softmax(-1)
    expected = sum(logits[len(prefix) - 1 + i, t].item() for i, t in enumerate(answer))
    assert score == pytest.approx(expected, abs=1e-4)
    normalized = backend.log_likelihood([prompt], ["Yes"], normalize=True)[0]
    assert normalized == pytest.approx(expected / len(answer), abs=1e-4)


def test_batched_calls_equal_single_calls(backend):
    prompts = [
        [picture("red"), "An image of"],
        ["Question: what is it? Answer:"],
        [picture("green"), "An image of a"],
    ]
    decoding = DecodingConfig(max_new_tokens=4, stop=[])
    together = backend.generate(prompts, decoding)
    assert together == [backend.generate([p], decoding)[0] for p in prompts]
    scores = backend.log_likelihood(prompts, ["cat", "dog", "bird"])
    singles = [backend.log_likelihood([p], [c])[0] for p, c in zip(prompts, ["cat", "dog", "bird"])]
    assert scores == pytest.approx(singles, abs=1e-4)


def test_demonstrations_are_documents_of_their_own(backend, tokenizer, tiny_config):
    q = tiny_config.connector.num_queries
    prompt = [
        picture("red"),
        "Question: what? Answer: red",
        DEMO_END,
        picture("blue"),
        "Question: what? Answer:",
    ]
    encoded, images = backend.encode(prompt, "blue")
    demo = tokenizer.encode_interleaved([IMAGE, "Question: what? Answer: red"], q, bos=True, eos=True)
    query = tokenizer.encode_interleaved(
        [IMAGE, "Question: what? Answer:", "blue"], q, bos=True, eos=False, learn=[False, False, True]
    )
    assert encoded.ids == demo.ids + query.ids and encoded.ids[len(demo) - 1] == tokenizer.eos_id
    assert encoded.learn == [False] * len(demo) + query.learn and len(images) == 2


def test_too_long_prompt_is_refused(backend):
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        backend.log_likelihood([[picture("red")] * 40], ["Yes"])
    fits = [picture("red")] * 28  # 28 x 18 + 1 = 505 tokens
    backend.log_likelihood([fits], ["Yes"])
    with pytest.raises(ValueError, match=r"\(\+20 to generate\)"):
        backend.generate([fits], DecodingConfig(max_new_tokens=20))


def test_bad_checkpoint_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint"):
        load_for_eval(tmp_path / "nothing")


def test_tasks_run_end_to_end_with_the_model(backend, tmp_path):
    data = tmp_path / "digits"
    (data / "images").mkdir(parents=True)
    rows = []
    for n in range(6):
        Image.new("RGB", (16, 16), (40 * n, 0, 0)).save(data / "images" / f"{n}.png")
        rows.append(
            {
                "id": str(n),
                "split": "test" if n < 4 else "demo",
                "image": f"images/{n}.png",
                "label": n % 2,
                "captions": [f"a digit {n % 2}"],
            }
        )
    (data / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "classes.json").write_text(json.dumps(["zero", "one"]))
    split = {"annotations": "set.jsonl", "classes": "classes.json"}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, kind, metrics in (("cls", "rank_choices", ["accuracy"]), ("cap", "generate", ["cider"])):
        (tasks / f"{name}.yaml").write_text(
            yaml.safe_dump(
                {
                    "kind": kind,
                    "metrics": metrics,
                    "decoding": {
                        "strategy": "beam",
                        "num_beams": 2,
                        "max_new_tokens": 3,
                        "rationale_max_new_tokens": 3,
                    },
                    "data": {
                        "format": "jsonl",
                        "root": str(data),
                        "eval": {**split, "splits": ["test"]},
                        "demos": {**split, "splits": ["demo"]},
                    },
                    "prompt": {
                        "query": "{image}The photo of the digit",
                        "rationale": "{image}Introduce this picture in detail:",
                    }
                    if kind == "rank_choices"
                    else {"query": "{image}An image of"},
                }
            )
        )
    (tasks / "raven.yaml").write_text(
        (Path(__file__).parents[1] / "kosmos/configs/eval/raven_generated.yaml")
        .read_text()
        .replace("count: 500", "count: 2")
        .replace("image_size: 160", "image_size: 32")
    )
    options = EvalOptions(
        tasks=["cls", "cap", "raven"],
        out=tmp_path / "out",
        task_dir=tasks,
        shots=[0, 1],
        bootstrap_resamples=100,
    )
    results = evaluate(backend, options)
    values = {(r["task"], r["shots"]): r["value"] for r in results["results"]}
    assert set(values) == {("cls", 0), ("cls", 1), ("cap", 0), ("cap", 1), ("raven", 0)}
    assert all(0.0 <= v <= 100.0 for (task, _), v in values.items() if task != "cap")
    record = json.loads(
        (tmp_path / "out/predictions/cls/random/1shot_trial0/predictions.jsonl").read_text().splitlines()[0]
    )
    assert isinstance(record["rationale"], str) and len(record["scores"]) == 2 and len(record["demos"]) == 1


def test_command_line_checks_tasks_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from kosmos.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the task files were checked")

    monkeypatch.setattr("kosmos.eval.backend.load_for_eval", must_not_load)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "kind: generate\ndata: {format: jsonl, eval: {annotations: x.jsonl}}\nprompt: {query: hi}\nmetrics: [cidr]\n"
    )
    code = main(["eval", "--checkpoint", "nowhere", "--tasks", str(bad), "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{bad}: metrics[0]: unknown metric 'cidr'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--retrieval-weights", "missing.pt"], "--retrieval-weights: missing.pt is not a file"),
        (["--retrieval-clip", "No-Such-CLIP", "--retrieval-weights", "x"], "open_clip has no model"),
        ([], "needs --retrieval-weights"),
    ],
)
def test_retrieval_options_are_checked_before_loading_the_model(
    tmp_path, monkeypatch, capsys, flags, message
):
    from kosmos.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the retrieval options were checked")

    monkeypatch.setattr("kosmos.eval.backend.load_for_eval", must_not_load)
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--checkpoint", "nowhere", "--tasks", "raven_generated", "--out", "out"]
    code = main([*args, "--shots", "0,2", "--demos", "rices", *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_command_line_runs_a_task(tmp_path, monkeypatch, capsys, tokenizer, tiny_config):
    from kosmos import config as config_io
    from kosmos.cli import main

    model = KosmosModel(tiny_config).eval()
    folder = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000020"
    folder.mkdir(parents=True)
    config_io.dump(tiny_config, folder / "model.yaml")
    (folder.parent / "latest").write_text("step_00000020")
    monkeypatch.setattr(
        "kosmos.eval.backend.load_for_eval", lambda path, device, dtype: (model.to(dtype), tokenizer, tiny_config)
    )
    code = main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "runs" / "tiny"),
            "--tasks",
            "raven_generated",
            "--out",
            str(tmp_path / "out"),
            "--limit",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert "| raven_generated | accuracy | 0 |" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["checkpoint"]["step"] == 20 and results["checkpoint"]["path"] == str(folder.resolve())
    assert results["model_config"]["connector"]["num_queries"] == 16
