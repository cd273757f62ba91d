import itertools
import shutil

import pytest

from kosmos.eval.metrics import bootstrap_ci, compute_metrics, scienceqa_breakdown
from kosmos.eval.metrics import captions as caption_metrics
from kosmos.eval.metrics.vqa import normalize_answer, vizwiz_accuracy, vqa_accuracy

HAS_JAVA = shutil.which("java") is not None


def leave_one_out_reference(prediction: str, humans: list[str]) -> float:
    """The VQA formula written out over explicit subsets of nine answers."""
    subsets = list(itertools.combinations(range(len(humans)), len(humans) - 1))
    return sum(min(1.0, sum(humans[i] == prediction for i in s) / 3) for s in subsets) / len(subsets)


# (prediction, human answers, score in %) computed by running the official scoring code on each case:
# VQAv2 by `PythonEvaluationTools/vqaEvaluation/vqaEval.py` of GT-Vision-Lab/VQA at its March 2021
# revision ("Fixed processing answers bug", a013f00; its `print` statements made Python 3), VizWiz by
# the accuracy loop of the VizWiz challenge's `VQAEval.evaluate`. Ten answers per question, as in both
# data sets.
VQA_OFFICIAL_CASES = [
    ("two", ["2"] * 10, 0.0),
    ("2", ["2"] * 10, 100.0),
    ("four", ["four"] * 10, 100.0),
    ("Four", ["four"] * 10, 0.0),
    ("dog", ["the dog"] * 4 + ["cat"] * 6, 100.0),
    ("the dog", ["dog"] * 4 + ["cat"] * 6, 100.0),
    ("Yes.", ["yes"] * 10, 0.0),
    ("Yes", ["yes"] * 3 + ["no"] * 7, 90.0),
    ("yes", ["yes"] * 2 + ["no"] * 8, 60.0),
    ("yes", ["yes"] + ["no"] * 9, 30.0),
    ("left", ["left"] * 4 + ["right"] * 6, 100.0),
    ("2.5", ["2.5"] * 5 + ["2"] * 5, 100.0),
    ("10,000", ["10000"] * 4 + ["10,000"] * 6, 100.0),
    ("10000", ["10,000"] * 10, 0.0),
    ("t-shirt", ["t shirt"] * 5 + ["tshirt"] * 5, 100.0),
    ("t-shirt", ["t-shirt"] * 10, 100.0),
    ("dont know", ["don't know"] * 7 + ["no"] * 3, 100.0),
    ("dont know", ["don't know"] * 10, 0.0),
    ("A Red Car", ["red car"] * 6 + ["car"] * 4, 100.0),
    ("none", ["0"] * 3 + ["none"] * 7, 100.0),
    ("one", ["1"] * 2 + ["one"] * 8, 100.0),
    ("hot dog", ["hotdog"] * 5 + ["hot dog"] * 5, 100.0),
    ("2:00 pm", ["2:00 pm"] * 4 + ["2 pm"] * 6, 100.0),
    ("yes!", ["yes"] * 9 + ["yes!"], 100.0),
    ("  cat\n", ["cat"] * 10, 100.0),
    ("cat's toy", ["cats toy"] * 5 + ["cat's toy"] * 5, 100.0),
    ("mr. smith", ["mr smith"] * 6 + ["smith"] * 4, 100.0),
    ("an apple", ["apple"] * 3 + ["an apple"] * 3 + ["fruit"] * 4, 100.0),
]
VIZWIZ_OFFICIAL_CASES = [
    ("unanswerable", ["unanswerable"] * 10, 100.0),
    ("Unanswerable.", ["unanswerable"] * 8 + ["unsuitable"] * 2, 100.0),
    ("i don't know", ["unanswerable"] * 10, 0.0),
    ("unknown", ["unanswerable"] * 6 + ["unknown"] * 4, 100.0),
    ("not sure", ["unanswerable"] * 10, 0.0),
    ("can't tell", ["unanswerable"] * 10, 0.0),
    ("unanswerable", ["unsuitable image"] * 4 + ["unsuitable"] * 2 + ["cat"] * 4, 0.0),
    ("unsuitable", ["unsuitable"] * 2 + ["unanswerable"] * 8, 60.0),
    ("two", ["2"] * 10, 100.0),
    ("2", ["two"] * 10, 0.0),
    ("dog", ["the dog"] * 4 + ["dog"] * 6, 100.0),
    ("the dog", ["dog"] * 10, 100.0),
    ("Yes.", ["yes"] * 10, 100.0),
    ("Coca Cola", ["coca cola"] * 3 + ["coke"] * 7, 90.0),
    ("coke", ["Coke"] * 10, 0.0),
    ("blue", ["blue"] * 2 + ["white"] * 8, 60.0),
    ("10,000", ["10,000"] * 10, 0.0),
    ("dont know", ["don't know"] * 10, 100.0),
]


@pytest.mark.parametrize("prediction, humans, expected", VQA_OFFICIAL_CASES)
def test_vqa_accuracy_equals_the_official_script(prediction, humans, expected):
    assert 100 * vqa_accuracy(prediction, humans) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, humans, expected", VIZWIZ_OFFICIAL_CASES)
def test_vizwiz_accuracy_equals_the_official_script(prediction, humans, expected):
    assert 100 * vizwiz_accuracy(prediction, humans) == pytest.approx(expected)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("yes!", "yes"),  # punctuation mark turned into a space, then spaces collapse
        ("yes.", "yes"),  # a period that is not a decimal point goes
        ("2.5", "2.5"),  # a decimal point stays
        ("1,000", "1000"),  # a digit-grouping comma makes every mark vanish
        ("red , blue", "red blue"),  # a mark next to a space vanishes
        ("t-shirt", "t shirt"),  # a mark inside a word becomes a space
        ("A Dog", "dog"),  # lower case, article dropped
        ("the an a cat", "cat"),
        ("Two", "2"),  # number words to digits
        ("none", "0"),
        ("dont", "don't"),  # contractions get their apostrophe
    ],
)
def test_vqa_answer_processing_rules(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize("matches", range(11))
def test_vqa_leave_one_out_average(matches):
    humans = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", humans) == pytest.approx(leave_one_out_reference("cat", humans))
    assert vizwiz_accuracy("cat", humans) == pytest.approx(leave_one_out_reference("cat", humans))


def test_vizwiz_metric_by_answer_type():
    records = [
        {
            "prediction": "unanswerable",
            "references": ["unanswerable"] * 10,
            "meta": {"answer_type": "unanswerable"},
        },
        {
            "prediction": "i don't know",
            "references": ["unanswerable"] * 10,
            "meta": {"answer_type": "unanswerable"},
        },
    ]
    [result], _ = compute_metrics(["vizwiz_accuracy"], records)
    assert result.value == 50.0 and result.breakdown == {"unanswerable": 50.0}


CAPTION_REFS = {
    "1": [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave.",
        "Man surfing a wave.",
    ],
    "2": ["Two dogs don't play; they're sleeping!", "Dogs sleeping on a couch.", "Two dogs asleep."],
    "3": ["A plate of food with broccoli (green).", "Broccoli and rice on a plate.", "A dinner plate."],
    "4": ["A giraffe standing in the grass.", "A tall giraffe in a field.", "The giraffe eats leaves."],
}
CAPTION_PREDICTIONS = {
    "1": "a man surfing a wave",
    "2": "two dogs sleeping on a couch.",
    "3": "a plate of broccoli",
    "4": "a zebra standing in a field",
}


@pytest.mark.parametrize(
    "use_java", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_JAVA, reason="no java"))]
)
def test_cider_equals_pycocoevalcap(use_java):
    from pycocoevalcap.cider.cider import Cider

    ours = caption_metrics.caption_scores(CAPTION_PREDICTIONS, CAPTION_REFS, ["cider"], use_java=use_java)
    tokenized, _ = caption_metrics.tokenize(
        {f"r{k}": [v] for k, v in CAPTION_PREDICTIONS.items()}
        | {f"g{k}": v for k, v in CAPTION_REFS.items()},
        use_java=use_java,
    )
    keys = sorted(CAPTION_REFS)
    corpus, per_image = Cider().compute_score(
        {k: tokenized[f"g{k}"] for k in keys}, {k: tokenized[f"r{k}"] for k in keys}
    )
    assert ours.values["cider"] == pytest.approx(100 * corpus)
    assert ours.per_sample["cider"] == pytest.approx([100 * s for s in per_image])
    assert ours.tokenizer == ("ptb" if use_java else "python")


@pytest.mark.skipif(not HAS_JAVA, reason="no java")
def test_python_tokenizer_matches_ptb():
    captions = [c for refs in CAPTION_REFS.values() for c in refs] + [
        "A t-shirt costs $2.50 -- or 1,000 yen?",
        'She said "hello" to the 3/4 crowd & left.',
        "A man's bike isn't here, can't go. I'm sure we'll win",
        "A [bracket] {brace} test: yes",
        "cannot gonna it's 5:30 p.m. Mr. Smith",
        "Dr. Who's e-mail is a@b.com ok.",
        "10% off #1 item*",
        "Won't you? Shouldn't've.",
        "A plate of food... Delicious!!",
        "'Quoted' words",
    ]
    data = {str(i): [c] for i, c in enumerate(captions)}
    java, _ = caption_metrics.tokenize(data, use_java=True)
    python, _ = caption_metrics.tokenize(data, use_java=False)
    assert python == java


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="java not found"):
        scores = caption_metrics.caption_scores(
            CAPTION_PREDICTIONS, CAPTION_REFS, ["cider", "bleu", "rouge_l", "meteor", "spice"]
        )
    assert {"cider", "bleu_4", "rouge_l"} <= set(scores.values)
    assert "Java" in scores.unavailable["meteor"] and "Java" in scores.unavailable["spice"]
    assert scores.tokenizer == "python"


@pytest.mark.skipif(not HAS_JAVA, reason="no java")
def test_meteor_runs_with_java():
    scores = caption_metrics.caption_scores(CAPTION_PREDICTIONS, CAPTION_REFS, ["meteor"])
    assert 0 < scores.values["meteor"] < 100
    assert "meteor" not in scores.per_sample  # corpus statistic, not a mean


def test_spice_reports_what_it_needs():
    reason = caption_metrics.metric_unavailable_reason("spice")
    if reason is not None:
        assert "Java" in reason or "CoreNLP" in reason
    assert "Java" in caption_metrics.metric_unavailable_reason("spice", java=False)


def test_caption_records_through_compute_metrics():
    records = [
        {"prediction": CAPTION_PREDICTIONS[k], "references": CAPTION_REFS[k]} for k in sorted(CAPTION_REFS)
    ]
    results, _ = compute_metrics(["cider", "bleu"], records)
    assert [r.metric for r in results] == ["cider", "bleu"]
    assert results[0].per_sample is not None and results[1].per_sample is None
    assert results[1].value == results[1].breakdown["bleu_4"]
    perfect = [{"prediction": refs[0], "references": refs} for refs in CAPTION_REFS.values()]
    assert compute_metrics(["cider"], perfect)[0][0].value > results[0].value


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown metric 'blue'"):
        compute_metrics(["blue"], [{"prediction": "x", "references": ["x"]}])


def test_accuracy_with_indices_and_free_text():
    records = [
        {"prediction": 1, "answer": 1, "choices": ["cat", "dog"]},
        {"prediction": "The Dog.", "answer": 1, "choices": ["cat", "dog"]},
        {"prediction": "a bird", "answer": 0, "choices": ["cat", "dog"]},
        {"prediction": 0, "answer": 1, "choices": ["cat", "dog"]},
    ]
    [result], _ = compute_metrics(["accuracy"], records)
    assert result.value == 50.0
    assert result.per_sample == [100.0, 100.0, 0.0, 0.0]


def test_scienceqa_breakdown_by_subject_context_and_grade():
    meta = [
        {"subject": "natural science", "hint": "", "image": "image.png", "grade": "grade3"},
        {"subject": "natural science", "hint": "a hint", "image": None, "grade": "grade8"},
        {"subject": "social science", "hint": "", "image": None, "grade": "grade5"},
        {"subject": "language science", "hint": "h", "image": "image.png", "grade": "grade12"},
    ]
    correct = [True, False, True, False]
    scores = scienceqa_breakdown(correct, meta)
    assert scores["natural"] == 50.0 and scores["social"] == 100.0 and scores["language"] == 0.0
    assert scores["has_image"] == 50.0 and scores["has_text"] == 0.0 and scores["no_context"] == 100.0
    assert scores["grade_1_6"] == 100.0 and scores["grade_7_12"] == 0.0
    assert scores["average"] == 50.0


def test_bootstrap_interval():
    scores = [0.0] * 50 + [100.0] * 50
    low, high = bootstrap_ci(scores, seed=1)
    assert low < 50.0 < high
    assert bootstrap_ci(scores, seed=1) == (low, high)
    wide = bootstrap_ci(scores[::10], seed=1)
    assert wide[1] - wide[0] > high - low
    assert bootstrap_ci([7.0] * 20) == (7.0, 7.0)
