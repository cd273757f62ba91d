"""kosmos as an lm-evaluation-harness model: lm-eval's own tasks (local JSON data, nothing from a hub)
rank and generate exactly as `kosmos eval` does on the same items with the same tiny model."""

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager

from kosmos.eval import lm_eval_model
from kosmos.eval.backend import ModelBackend
from kosmos.eval.harness import EvalOptions, evaluate
from kosmos.eval.tasks import DecodingConfig
from kosmos.model import KosmosModel, sequence_log_likelihood
from kosmos.tokenizer import Encoded

ITEMS = [
    {"id": "rs0", "item1": "an ant", "item2": "a car", "choices": ["Yes", "No"], "answer": 1},
    {"id": "rs1", "item1": "a house", "item2": "a cat", "choices": ["Yes", "No"], "answer": 0},
    {"id": "rs2", "item1": "a mouse", "item2": "an elephant", "choices": ["Yes", "No"], "answer": 1},
    {"id": "rs3", "item1": "a tree", "item2": "a leaf", "choices": ["Maybe", "Yes", "No"], "answer": 1},
]


def write_tasks(folder, data):
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
    }
    mc = {
        **common,
        "task": "kosmos_size_mc",
        "output_type": "multiple_choice",
        "doc_to_text": "Is {{item1}} larger than {{item2}}?",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}],
    }
    gen = {
        **common,
        "task": "kosmos_size_gen",
        "output_type": "generate_until",
        "doc_to_text": "Is {{item1}} larger than {{item2}}?",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }
    rolling = {
        **common,
        "task": "kosmos_size_ppl",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "Is {{item1}} larger than {{item2}}?",
        "metric_list": [{"metric": "word_perplexity"}],
    }
    for task in (mc, gen, rolling):
        (folder / f"{task['task']}.yaml").write_text(json.dumps(task))


@pytest.fixture
def setup(tmp_path, tokenizer, tiny_config):
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "lm_tasks").mkdir()
    write_tasks(tmp_path / "lm_tasks", data)
    backend = ModelBackend(KosmosModel(tiny_config).eval(), tokenizer, batch_size=3)
    return tmp_path, data, backend


def run_lm_eval(folder, model, tasks, checkpoint="unused"):
    return lm_eval.simple_evaluate(
        model=model,
        model_args=f"checkpoint={checkpoint}" if isinstance(model, str) else None,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder / "lm_tasks"), include_defaults=False),
        log_samples=True,
        num_fewshot=0,
    )


def test_multiple_choice_ranks_as_our_harness_does(setup, monkeypatch):
    tmp_path, data, backend = setup
    # Through the registry by name, as `--model kosmos --model_args checkpoint=...` does.
    monkeypatch.setattr(
        "kosmos.eval.backend.load_for_eval", lambda path, device: (backend.model, backend.tokenizer, None)
    )
    out = run_lm_eval(tmp_path, "kosmos", ["kosmos_size_mc"])
    lm_scores = {
        s["doc"]["id"]: [r[0][0] for r in s["resps"]]
        for s in sorted(out["samples"]["kosmos_size_mc"], key=lambda s: s["doc_id"])
    }
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "size.yaml").write_text(
        json.dumps(
            {
                "kind": "rank_choices",
                "data": {"format": "text_choices", "root": str(tmp_path), "eval": {"annotations": data.name}},
                "prompt": {"query": "Is {item1} larger than {item2}?"},
                "metrics": ["accuracy"],
            }
        )
    )
    options = EvalOptions(
        tasks=["size"], out=tmp_path / "out", task_dir=tmp_path / "ours", bootstrap_resamples=10
    )
    evaluate(backend, options)
    records = [
        json.loads(line) for line in (tmp_path / "out/predictions/size/0shot/predictions.jsonl").open()
    ]
    ours = {r["id"]: r["scores"] for r in records}
    assert set(lm_scores) == set(ours) == {item["id"] for item in ITEMS}
    for item_id, scores in ours.items():
        assert lm_scores[item_id] == pytest.approx(scores, abs=1e-4)
    accuracy = out["results"]["kosmos_size_mc"]["acc,none"]
    assert accuracy == pytest.approx(sum(r["prediction"] == r["answer"] for r in records) / len(records))


def test_generation_and_rolling_likelihood_equal_the_backends(setup):
    tmp_path, _, backend = setup
    out = run_lm_eval(
        tmp_path, lm_eval_model.KosmosLM(backend=backend), ["kosmos_size_gen", "kosmos_size_ppl"]
    )
    generated = {s["doc"]["id"]: s["resps"][0][0] for s in out["samples"]["kosmos_size_gen"]}
    decoding = DecodingConfig(strategy="greedy", max_new_tokens=6, stop=["\n"])
    for item in ITEMS:
        prompt = [f"Is {item['item1']} larger than {item['item2']}?"]
        assert generated[item["id"]] == backend.generate([prompt], decoding)[0]
    rolling = {s["doc"]["id"]: s["resps"][0][0] for s in out["samples"]["kosmos_size_ppl"]}
    for item in ITEMS:
        text = f"Is {item['item1']} larger than {item['item2']}?"
        assert rolling[item["id"]] == pytest.approx(backend.log_likelihood([[]], [text])[0], abs=1e-4)


def test_is_greedy_says_whether_every_token_is_the_likeliest(setup):
    _, _, backend = setup
    prompt = backend.tokenizer.encode_interleaved(["Is an ant larger than a car?"], 1, eos=False)
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        likeliest = int(
            backend.model(ids, image_mask=torch.zeros_like(ids, dtype=torch.bool)).logits[0, -1].argmax()
        )
    other = (likeliest + 1) % backend.tokenizer.vocab_size

    def extended(token):
        return Encoded(prompt.ids + [token], prompt.image_mask + [False], [False] * len(prompt) + [True])

    _, greedy = sequence_log_likelihood(backend.model, [extended(likeliest), extended(other)], greedy=True)
    assert greedy.tolist() == [True, False]


def test_rolling_windows_cover_a_text_longer_than_the_model(setup):
    _, _, backend = setup
    model = lm_eval_model.KosmosLM(backend=backend)
    words = " ".join(["larger"] * (backend.max_positions + 40))

    class Request:
        args = (words,)

    [total] = model.loglikelihood_rolling([Request()])
    tokens = backend.tokenizer.encode(words)
    assert len(tokens) > backend.max_positions
    # Every token is scored once: the sum of per-token log-probabilities is below each window's.
    first = backend.log_likelihood([[]], [backend.tokenizer.decode(tokens[: backend.max_positions - 1])])[0]
    assert total < first < 0


@pytest.mark.slow
def test_an_imported_transformers_kosmos2_is_evaluated_by_its_checkpoint(setup, tokenizer, tiny_config):
    from kosmos.convert import export_to_hf

    tmp_path, _, backend = setup
    hf = export_to_hf(backend.model.state_dict(), tiny_config, tokenizer, tmp_path / "hf")
    imported = tmp_path / "kosmos2"
    done = subprocess.run(
        [sys.executable, "-m", "kosmos", "convert", "from-hf", str(hf), str(imported)],
        capture_output=True,
        text=True,
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = run_lm_eval(tmp_path, "kosmos", ["kosmos_size_mc"], checkpoint=imported)
    for sample in out["samples"]["kosmos_size_mc"]:
        item = sample["doc"]
        prompt = [f"Is {item['item1']} larger than {item['item2']}?"]
        expected = backend.log_likelihood([prompt] * len(item["choices"]), item["choices"])
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-4)
