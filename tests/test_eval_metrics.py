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
# revision ("Fixed processing answers bug", a013f00; its `print` statements made Python 3), given the
# prediction after the evaluation server's answer processor (as MMF's `EvalAIAnswerProcessor` has it:
# lower case, `,` and `?` removed, `'s` split off, then the script's processPunctuation and
# processDigitArticle); VizWiz by the accuracy loop of the VizWiz challenge's `VQAEval.evaluate`.
# Ten answers per question, as in both data sets.
VQA_OFFICIAL_CASES = [
    ("two", ["2"] * 10, 100.0),
    ("2", ["2"] * 10, 100.0),
    ("four", ["four"] * 10, 0.0),
    ("Four", ["four"] * 10, 0.0),
    ("dog", ["the dog"] * 4 + ["cat"] * 6, 100.0),
    ("the dog", ["dog"] * 4 + ["cat"] * 6, 100.0),
    ("Yes.", ["yes"] * 10, 100.0),
    ("Yes", ["yes"] * 3 + ["no"] * 7, 90.0),
    ("yes", ["yes"] * 2 + ["no"] * 8, 60.0),
    ("yes", ["yes"] + ["no"] * 9, 30.0),
    ("left", ["left"] * 4 + ["right"] * 6, 100.0),
    ("2.5", ["2.5"] * 5 + ["2"] * 5, 100.0),
    ("10,000", ["10000"] * 4 + ["10,000"] * 6, 100.0),
    ("10000", ["10,000"] * 10, 0.0),
    ("t-shirt", ["t shirt"] * 5 + ["tshirt"] * 5, 100.0),
    ("t-shirt", ["t-shirt"] * 10, 0.0),
    ("dont know", ["don't know"] * 7 + ["no"] * 3, 100.0),
    ("dont know", ["don't know"] * 10, 100.0),
    ("A Red Car", ["red car"] * 6 + ["car"] * 4, 100.0),
    ("none", ["0"] * 3 + ["none"] * 7, 100.0),
    ("one", ["1"] * 2 + ["one"] * 8, 100.0),
    ("hot dog", ["hotdog"] * 5 + ["hot dog"] * 5, 100.0),
    ("2:00 pm", ["2:00 pm"] * 4 + ["2 pm"] * 6, 100.0),
    ("yes!", ["yes"] * 9 + ["yes!"], 100.0),
    ("  cat\n", ["cat"] * 10, 100.0),
    # The server splits off "'s" (and drops "," and "?") before the script sees the answer.
    ("cat's toy", ["cats toy"] * 5 + ["cat's toy"] * 5, 0.0),
    ("It's a dog.", ["it's a dog"] * 3 + ["dog"] * 7, 0.0),
    ("red,white", ["redwhite"] * 4 + ["red white"] * 3 + ["white"] * 3, 100.0),
    ("what?", ["what"] * 10, 100.0),
    # At most 32 periods go per processing: once by the server, once more when the humans disagree.
    ("no" + "." * 40, ["no"] * 10, 0.0),
    ("no" + "." * 40, ["no"] * 9 + ["yes"], 100.0),
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
    # VizWiz's contraction table restores the curly apostrophe; there is no word step.
    ("dont know", ["don't know"] * 10, 0.0),
    ("dont know", ["don’t know"] * 10, 100.0),
    ("It's a dog.", ["it's dog"] * 10, 100.0),
    ("red,white", ["red white"] * 10, 100.0),
    ("no" + "." * 40, ["no"] * 10, 0.0),
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
        ("no" + "." * 40, "no" + "." * 8),  # at most 32 periods go
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


# (caption, tokens) as pycocoevalcap's PTBTokenizer (Stanford CoreNLP, Java) returns them after its
# punctuation filter: obtained by running `kosmos.eval.metrics.captions.tokenize(..., use_java=True)`
# on each caption. The stand-in used without Java must give the same tokens.
PTB_CASES = [
    ("Music of the 1990's was loud.", "music of the 1990 's was loud"),
    ("Kids of the '80s dance.", "kids of the '80s dance"),
    ("A man who is 5'10\" tall.", "a man who is 5 10 tall"),
    ("They play rock 'n' roll music.", "they play rock 'n' roll music"),
    ("Y'all come back now.", "y' all come back now"),
    ("Wait...what is that?", "wait what is that"),
    ("'Tis the season to be jolly.", "'t is the season to be jolly"),
    ("A dog's bone isn't here.", "a dog 's bone is n't here"),
    ("The cats' toys are everywhere.", "the cats toys are everywhere"),
    ('He said "hello" to me.', "he said hello to me"),
    ("A man (wearing a hat) walks.", "a man -lrb- wearing a hat -rrb- walks"),
    ("Two dogs [in a box] sit.", "two dogs -lsb- in a box -rsb- sit"),
    ("A sign reads {open}.", "a sign reads -lcb- open -rcb-"),
    ("I cannot believe it!", "i can not believe it"),
    ("We're gonna win, wanna bet?", "we 're gon na win wan na bet"),
    ("It costs $5.50 today.", "it costs $ 5.50 today"),
    ("About 1,000 people came.", "about 1,000 people came"),
    ("The U.S. flag waves.", "the u.s. flag waves"),
    ("Mr. Smith met Dr. Jones.", "mr. smith met dr. jones"),
    ("It is 3:30 p.m. now.", "it is 3:30 p.m. now"),
    ("A well-known fact.", "a well-known fact"),
    ("A man -- tall and thin -- walks.", "a man tall and thin walks"),
    ("Really?!", "really ?!"),
    ("No way!!!", "no way !!!"),
    ("She said: yes; he said: no.", "she said yes he said no"),
    ("A 50% discount.", "a 50 % discount"),
    ("Email me at a@b.com please.", "email me at a@b.com please"),
    ("The end.", "the end"),
    ("A plate of food...", "a plate of food"),
    ("It's 10 o'clock.", "it 's 10 o'clock"),
    ("Don't you dare.", "do n't you dare"),
    ("I'd've gone.", "i 'd 've gone"),
    ("They'll be fine.", "they 'll be fine"),
    ("You're late, aren't you?", "you 're late are n't you"),
    ("ma'am, I'm sorry", "ma'am i 'm sorry"),
    ("A #1 fan", "a # 1 fan"),
    ("A cat & a dog", "a cat & a dog"),
    ("x + y = z", "x + y = z"),
    ("A 3-year-old child", "a 3-year-old child"),
    ("An iPhone 12 Pro.", "an iphone 12 pro"),
    ("Les Misérables is playing.", "les misérables is playing"),
    ("naïve café owner", "naïve café owner"),
    ("A man\nwalks", "a man walks"),
    ("  spaces   around  ", "spaces around"),
    ("Hello , world", "hello world"),
    ("A 'quoted' word", "a quoted word"),
    ("Fish 'n' chips", "fish 'n' chips"),
    ("The '90s were fun", "the '90s were fun"),
    ("rock'n'roll", "rock 'n' roll"),
    ("o'clock", "o'clock"),
    ("O'Neil's pub", "o'neil 's pub"),
    ("can't won't shan't", "ca n't wo n't sha n't"),
    ("gimme that", "gim me that"),
    ("lemme see", "lem me see"),
    ("gotta go", "got ta go"),
    ("He's 6' tall", "he 's 6 tall"),
    ("a 2x4 board", "a 2x4 board"),
    ("1/2 cup", "1/2 cup"),
    ("smile :)", "smile :-rrb-"),
    ("a man... standing", "a man standing"),
    ("a man . standing", "a man standing"),
    ("etc.", "etc."),
    ("vs. them", "vs. them"),
    ("U.S.A.", "u.s.a."),
    ("A.M.", "a.m."),
    ("St. Louis", "st. louis"),
    ("it's 5 p.m.", "it 's 5 p.m."),
    ("the 1990s", "the 1990s"),
    ("a b-52 bomber", "a b-52 bomber"),
    ("Tom & Jerry's", "tom & jerry 's"),
    ("what's that?", "what 's that"),
    ("wait.. what", "wait what"),
    ("a <b> tag", "a <b> tag"),
    ("hash#tag", "hash #tag"),
    ("@user hi", "@user hi"),
    ("50-50 chance", "50-50 chance"),
    ("Ph.D. student", "ph.d. student"),
    ("e.g. this", "e.g. this"),
    ("don't!", "do n't"),
    ("(hi)", "-lrb- hi -rrb-"),
    ('"quoted."', "quoted"),
    ("it's.", "it 's"),
    ("a '60s car.", "a '60s car"),
    ("...and then", "and then"),
    ("two--three", "two three"),
    ('3.5" screen', "3.5 screen"),
    ("5'11\" man", "5 11 man"),
    ("#hashtag!", "#hashtag"),
    ("'hello'", "hello"),
    ("the dog's.", "the dog 's"),
    ("A Man's hat.", "a man 's hat"),
    ("o'clock.", "o'clock"),
    ("cats' toys", "cats toys"),
    ("It's 1990's style", "it 's 1990 's style"),
    ("a (big) dog's toy", "a -lrb- big -rrb- dog 's toy"),
    ('"Don\'t"', "do n't"),
    ("ok!?", "ok !?"),
    ("wait... what?", "wait what"),
    ("hey:", "hey"),
    ("a/b", "a/b"),
    ("half-and-half", "half-and-half"),
    ("A cat, a dog; a bird.", "a cat a dog a bird"),
    ("100 m.p.h.", "100 m.p.h."),
    ("U.K.", "u.k."),
    ("'tis.", "'t is"),
    ("Y'all!", "y' all"),
    ("rock 'n' roll!", "rock 'n' roll"),
    ("the '80s.", "the '80s"),
    ("twas", "twas"),
    ("gonna", "gon na"),
    ("can't.", "ca n't"),
    ("Mr.", "mr."),
    ("no.", "no"),
    ("No. 7", "no. 7"),
]


@pytest.mark.parametrize("caption, expected", PTB_CASES)
def test_python_tokenizer_equals_the_java_ptb_tokenizer(caption, expected):
    assert caption_metrics.python_ptb_tokenize(caption) == expected


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
