"""HatefulMemes, WebSRC and the visual-commonsense probes on the fixtures under tests/fixtures/eval,
scored by the harness against values worked out by hand."""

import json
from pathlib import Path

import pytest

from kosmos.config import ConfigError
from kosmos.eval.datasets import load_samples
from kosmos.eval.harness import EvalOptions, evaluate
from kosmos.eval.metrics import compute_metrics, exact_match, token_f1
from kosmos.eval.prompts import is_image
from kosmos.eval.tasks import load_task

FIXTURES = Path(__file__).parent / "fixtures" / "eval"

# Log-likelihood margin of "yes" over "no" per meme (by its text), and the fixture's labels.
MEME_MARGINS = {
    "its their character not their color that matters": -1.0,  # label 0
    "don't be afraid to love again everyone is not like your ex": 0.5,  # label 0
    "putting bows on your pet": 2.0,  # label 1
    "i love everything and everybody! except for squirrels i hate squirrels": 1.5,  # label 0
    "everybody loves chocolate chip cookies": 0.2,  # label 1
    "go sports! do the thing! win the points!": 3.0,  # label 1
}
WEBSRC_ANSWERS = {
    "What is the price of the car?": "$23,495",  # exact
    "What is the mileage?": "12",  # reference "12 miles"
    "Who is the publisher of this book?": "the Penguin Books",  # reference "Penguin Books Ltd."
    "Who wrote the book?": "Hemingway, Ernest",  # reference "Ernest Hemingway"
}
# What the scripted model believes, by the object named in the prompt.
BELIEFS = {
    "an ant": "No",
    "a house": "Yes",
    "a mouse": "Yes",
    "a banana": "yellow",
    "snow": "white",
    "a tomato": "green",
    "grass": "green",
    "a crow": "black",
    "the sky": "blue",
    "chocolate": "black",
}


def prompt_text(prompt) -> str:
    return " ".join(part for part in prompt if isinstance(part, str))


class ScriptedBackend:
    """Answers from the tables above and keeps every prompt it is given."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, decoding, max_new_tokens=None):
        self.prompts.extend(prompts)
        return [next(a for q, a in WEBSRC_ANSWERS.items() if f"Q: {q}" in prompt_text(p)) for p in prompts]

    def log_likelihood(self, prompts, continuations, normalize=False):
        self.prompts.extend(prompts)
        scores = []
        for prompt, continuation in zip(prompts, continuations):
            text = prompt_text(prompt)
            margin = next((m for meme, m in MEME_MARGINS.items() if meme in text), None)
            if margin is not None:
                scores.append(margin if continuation == "yes" else 0.0)
            else:
                belief = next(b for thing, b in BELIEFS.items() if f" {thing} " in f" {text} ")
                scores.append(1.0 if continuation == belief else 0.0)
        return scores


def run(tmp_path, *tasks):
    backend = ScriptedBackend()
    options = EvalOptions(tasks=list(tasks), out=tmp_path / "out", data_root=FIXTURES, bootstrap_resamples=10)
    results = evaluate(backend, options)
    values = {(e["task"], e["metric"]): e["value"] for e in results["summary"]}
    return values, backend


def test_hateful_memes_roc_auc_and_accuracy(tmp_path):
    values, backend = run(tmp_path, "hateful_memes")
    # Positives' margins 2.0, 0.2, 3.0 against negatives' -1.0, 0.5, 1.5: 7 of the 9 pairs ordered.
    assert values[("hateful_memes", "roc_auc")] == pytest.approx(100 * 7 / 9)
    # "yes" wins where the margin is above 0: right on 42953, 13894, 82403, 16952.
    assert values[("hateful_memes", "accuracy")] == pytest.approx(100 * 4 / 6)
    assert all(is_image(p[0]) for p in backend.prompts)
    assert "Text on the image: putting bows on your pet Is it hateful? Answer:" in {
        prompt_text(p) for p in backend.prompts
    }


def test_websrc_with_and_without_the_page_text(tmp_path):
    values, backend = run(tmp_path, "websrc", "websrc_no_text")
    for task in ("websrc", "websrc_no_text"):
        assert values[(task, "exact_match")] == pytest.approx(25.0)
        # F1 per question: 1, 2/3 ("12" in "12 miles"), 0.8 ("penguin books" in "penguin books ltd"), 1.
        assert values[(task, "f1")] == pytest.approx(100 * (1 + 2 / 3 + 0.8 + 1) / 4)
    with_text = [prompt_text(p) for p in backend.prompts if "Context:" in prompt_text(p)]
    assert len(with_text) == 4 and all(
        "Publisher: Penguin Books Ltd." in t or "Mileage" in t for t in with_text
    )
    assert len(backend.prompts) == 8 and all(is_image(p[0]) for p in backend.prompts)


def test_visual_commonsense_probes_rank_text_only(tmp_path):
    values, backend = run(tmp_path, "relative_size", "memory_color", "color_terms")
    assert values[("relative_size", "accuracy")] == pytest.approx(100 * 2 / 3)  # wrong on the mouse
    assert values[("memory_color", "accuracy")] == pytest.approx(75.0)  # wrong on the tomato
    assert values[("color_terms", "accuracy")] == pytest.approx(100 * 2 / 3)  # wrong on chocolate
    assert not any(is_image(part) for p in backend.prompts for part in p)
    assert "Is a house larger than a cat?" in {prompt_text(p) for p in backend.prompts}
    assert "The color of the sky is?" in {prompt_text(p) for p in backend.prompts}


def test_extractive_scores_follow_the_squad_rule():
    assert exact_match("The Penguin Books Ltd", ["Penguin Books Ltd."]) == 1.0
    assert exact_match("Penguin", ["Penguin Books Ltd."]) == 0.0
    assert token_f1("penguin books", ["Penguin Books Ltd.", "Penguin"]) == pytest.approx(0.8)
    assert token_f1("", [""]) == 1.0 and token_f1("x", ["y"]) == 0.0


def test_roc_auc_refuses_what_it_cannot_score():
    one_label = [{"scores": [0.0, 1.0], "answer": 1, "prediction": 1}] * 2
    with pytest.raises(ValueError, match="both labels"):
        compute_metrics(["roc_auc"], one_label)
    with pytest.raises(ValueError, match="two scored choices"):
        compute_metrics(["roc_auc"], [{"scores": [0.0, 1.0, 2.0], "answer": 1, "prediction": 2}])


def test_bad_rows_are_refused(tmp_path):
    (tmp_path / "dev_seen.jsonl").write_text(
        json.dumps({"id": 1, "img": "x.png", "label": 2, "text": "t"}) + "\n"
    )
    task = load_task("hateful_memes", overrides=[f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="meme 1 has label 2"):
        load_samples(task)
    (tmp_path / "rs.jsonl").write_text(
        json.dumps({"id": "a", "item1": "x", "choices": ["Yes"], "answer": 3}) + "\n"
    )
    task = load_task("relative_size", overrides=[f"data.root={tmp_path}", "data.eval.annotations=rs.jsonl"])
    with pytest.raises(ConfigError, match="item a answer 3"):
        load_samples(task)
