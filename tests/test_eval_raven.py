import itertools
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kosmos.config import ConfigError
from kosmos.eval import raven
from kosmos.eval.datasets import load_image, load_samples
from kosmos.eval.harness import EvalOptions, evaluate
from kosmos.eval.tasks import load_task

# Attribute-level puzzles for the statistics; only samples are rendered.
PUZZLES = raven.generate_puzzles(3000, seed=7)
# Other puzzles, from which the solvers that learn (a value prior, a count prior) learn.
TRAINING = raven.generate_puzzles(2000, seed=8)
EVAL_IMAGE_SIZE = load_task("raven_generated").data.eval.image_size
CHANCE = 1 / raven.DEFAULT_CANDIDATES
# One-sided level per solver; the seeds are fixed, so a pass is not luck that could change run to run.
ALPHA = 1e-3


def binomial_tail(hits: int, trials: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(trials, p)."""
    log_terms = [
        math.lgamma(trials + 1)
        - math.lgamma(k + 1)
        - math.lgamma(trials - k + 1)
        + k * math.log(p)
        + (trials - k) * math.log1p(-p)
        for k in range(hits, trials + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def assert_at_chance(name, picks, puzzles):
    hits = sum(pick == p.answer for pick, p in zip(picks, puzzles))
    p_value = binomial_tail(hits, len(puzzles), CHANCE)
    assert p_value > ALPHA, f"{name}: {hits}/{len(puzzles)} right, above chance (p = {p_value:.2g})"


# --- an answer checker that shares nothing with the generator's ---------------------------------------
# It derives what each rule predicts for the missing panel from the first two rows and the first two
# panels of the last row, instead of testing whether a completed grid fits a rule.


def predicted_numbers(rows, arithmetic=True):
    (a1, b1, c1), (a2, b2, c2), (a3, b3) = rows[0], rows[1], rows[2][:2]
    out = set()
    if a1 == b1 == c1 and a2 == b2 == c2 and a3 == b3:
        out.add(a3)
    step = b1 - a1
    if step and c1 - b1 == step and b2 - a2 == step and c2 - b2 == step and b3 - a3 == step:
        out.add(b3 + step)
    if arithmetic and c1 == a1 + b1 and c2 == a2 + b2:
        out.add(a3 + b3)
    if arithmetic and c1 == a1 - b1 and c2 == a2 - b2:
        out.add(a3 - b3)
    out |= predicted_permutation(rows)
    return out


def predicted_permutation(rows):
    values = set(rows[0])
    if len(values) != 3 or set(rows[1]) != values:
        return set()
    columns = [values - {rows[0][c], rows[1][c]} for c in range(3)]
    if all(len(column) == 1 for column in columns) and [*columns[0], *columns[1]] == list(rows[2][:2]):
        return columns[2]
    return set()


def predicted_slot_sets(rows):
    (a1, b1, c1), (a2, b2, c2), (a3, b3) = rows[0], rows[1], rows[2][:2]
    out = set()
    if a1 == b1 == c1 and a2 == b2 == c2 and a3 == b3:
        out.add(a3)
    for step in (-2, -1, 1, 2):

        def move(slots, step=step):
            return frozenset((s + step) % 9 for s in slots)

        if b1 == move(a1) and c1 == move(b1) and b2 == move(a2) and c2 == move(b2) and b3 == move(a3):
            out.add(move(b3))
    if c1 == a1 | b1 and c2 == a2 | b2:
        out.add(a3 | b3)
    if c1 == a1 - b1 and c2 == a2 - b2:
        out.add(a3 - b3)
    return out | predicted_permutation(rows)


def correct_candidates(puzzle):
    def rows(values):
        return [values[0:3], values[3:6], values[6:8]]

    context = puzzle.context
    shapes = predicted_numbers(rows([p.shape for p in context]), arithmetic=False)
    sizes = predicted_numbers(rows([p.size for p in context]))
    colours = predicted_numbers(rows([p.colour for p in context]))
    numbers = predicted_numbers(rows([p.number for p in context]))
    slot_sets = predicted_slot_sets(rows([frozenset(p.positions) for p in context]))
    return [
        i
        for i, c in enumerate(puzzle.candidates)
        if c.shape in shapes
        and c.size in sizes
        and c.colour in colours
        and (c.number in numbers or frozenset(c.positions) in slot_sets)
    ]


def test_exactly_one_candidate_is_correct_by_an_independent_checker():
    for puzzle in PUZZLES:
        assert correct_candidates(puzzle) == [puzzle.answer], puzzle.rules
        assert len(puzzle.candidates) == raven.DEFAULT_CANDIDATES == len(set(puzzle.candidates))


def test_the_generators_checker_agrees():
    for puzzle in PUZZLES[:500]:
        correct = [raven.candidate_is_correct(puzzle.context, c) for c in puzzle.candidates]
        assert [i for i, ok in enumerate(correct) if ok] == [puzzle.answer]


# --- solvers that never look at the context ---------------------------------------------------------------


def value_keys(panel):
    return [
        ("number", panel.number),
        ("positions", panel.positions),
        ("shape", panel.shape),
        ("size", panel.size),
        ("colour", panel.colour),
    ]


def argmax(scores):
    return max(range(len(scores)), key=scores.__getitem__)


def train_value_prior(puzzles):
    """log P(a candidate holding this value is the answer) relative to chance, from other puzzles."""
    as_answer, as_candidate = Counter(), Counter()
    for p in puzzles:
        as_answer.update(value_keys(p.candidates[p.answer]))
        for c in p.candidates:
            as_candidate.update(value_keys(c))
    return defaultdict(
        float, {k: math.log((as_answer[k] + 1) / ((as_candidate[k] + 6) * CHANCE)) for k in as_candidate}
    )


def value_distances(candidates):
    """Each candidate's summed distance to the others over its attribute values."""
    return [
        sum(
            abs(a.size - b.size)
            + abs(a.colour - b.colour)
            + abs(a.number - b.number)
            + (a.shape != b.shape)
            + len(set(a.positions) ^ set(b.positions))
            for b in candidates
        )
        for a in candidates
    ]


def test_candidate_only_solvers_score_at_chance():
    prior = train_value_prior(TRAINING)
    solvers = {
        "value prior from other seeds": lambda cs: argmax([sum(prior[k] for k in value_keys(c)) for c in cs]),
        "odd one out": lambda cs: argmax(value_distances(cs)),
        "most central": lambda cs: argmax([-d for d in value_distances(cs)]),
        "most common values": lambda cs: raven.most_common_values_choice([], cs),
    }
    solvers |= {f"always place {i}": lambda cs, i=i: i for i in range(raven.DEFAULT_CANDIDATES)}
    for name, solve in solvers.items():
        assert_at_chance(name, [solve(p.candidates) for p in PUZZLES], PUZZLES)


def context_counts(puzzle, candidate):
    """(attribute, how often the context shows the candidate's value of it), per attribute."""
    seen = Counter(key for panel in puzzle.context for key in value_keys(panel))
    return [(key[0], seen[key]) for key in value_keys(candidate)]


def train_count_prior(puzzles):
    """log P(a candidate is the answer | how often the context shows each of its values)."""
    as_answer, as_candidate = Counter(), Counter()
    for p in puzzles:
        for i, c in enumerate(p.candidates):
            features = context_counts(p, c)
            as_candidate.update(features)
            if i == p.answer:
                as_answer.update(features)
    return defaultdict(
        float, {k: math.log((as_answer[k] + 1) / ((as_candidate[k] + 6) * CHANCE)) for k in as_candidate}
    )


def slot_occupancy(puzzle, candidate):
    """How often the context fills the slots the candidate fills."""
    filled = Counter(slot for panel in puzzle.context for slot in panel.positions)
    return sum(filled[slot] for slot in candidate.positions)


def test_counting_the_context_finds_the_answer_at_chance():
    prior = train_count_prior(TRAINING)
    solvers = {
        "frequency rank (context_copy)": lambda p: raven.context_copy_choice(p.context, p.candidates),
        "seen 2, 5 or 8 times (context_count)": lambda p: raven.context_count_choice(p.context, p.candidates),
        "count prior from other seeds": lambda p: argmax(
            [sum(prior[f] for f in context_counts(p, c)) for c in p.candidates]
        ),
        "slots the context fills most": lambda p: argmax([slot_occupancy(p, c) for c in p.candidates]),
        "slots the context fills least": lambda p: argmax([-slot_occupancy(p, c) for c in p.candidates]),
    }
    for name, solve in solvers.items():
        assert_at_chance(name, [solve(p) for p in PUZZLES], PUZZLES)


def test_the_context_shows_every_candidate_value_as_often_as_the_answers():
    for p in PUZZLES[:1000]:
        seen = Counter(key for panel in p.context for key in value_keys(panel))
        for attribute in ("number", "positions", "shape", "size", "colour"):
            counts = {seen[(attribute, getattr(c, attribute))] for c in p.candidates}
            # Number layouts give each number its own random slots: those sets are seldom seen at all.
            assert len(counts) == 1 or (attribute == "positions" and p.rules["layout"].startswith("number"))


def test_the_same_test_flags_a_little_reasoning():
    # The binomial test has the power to see a small edge: continuing the last row's step in the number
    # of shapes alone (one attribute, one rule) is right a little more often than chance.
    def continue_the_number(puzzle):
        first, second = puzzle.context[6].number, puzzle.context[7].number
        return argmax([c.number == 2 * second - first for c in puzzle.candidates])

    hits = sum(continue_the_number(p) == p.answer for p in PUZZLES)
    assert binomial_tail(hits, len(PUZZLES), CHANCE) < ALPHA


def test_answer_values_are_distributed_like_the_distractors():
    # Per attribute, the share of the answer among the candidates holding a value is 1/6 for every
    # value (within a few standard errors); the old shortcut was values the rules never produce.
    for attribute in ("number", "shape", "size", "colour"):
        as_answer, as_candidate = Counter(), Counter()
        for p in PUZZLES:
            as_answer[getattr(p.candidates[p.answer], attribute)] += 1
            as_candidate.update(getattr(c, attribute) for c in p.candidates)
        for value, n in as_candidate.items():
            expected = n * CHANCE
            assert abs(as_answer[value] - expected) < 4.5 * math.sqrt(expected) + 1, (attribute, value)


def test_candidates_differ_by_visible_steps():
    for p in PUZZLES[:1000]:
        for attribute, gap in raven.MIN_GAP.items():
            values = sorted({getattr(c, attribute) for c in p.candidates})
            assert all(b - a >= gap for a, b in itertools.pairwise(values)), (attribute, values)


def test_every_rule_is_used():
    used = Counter(
        rule.split()[1] if name == "layout" else rule.split()[0]
        for p in PUZZLES
        for name, rule in p.rules.items()
    )
    assert {"constant", "progression", "arithmetic", "distribute_three"} <= set(used)
    layouts = Counter(p.rules["layout"].split()[0] for p in PUZZLES)
    assert set(layouts) == {"number", "position"}


# --- rendering -------------------------------------------------------------------------------------------


def grey(panel, size=EVAL_IMAGE_SIZE):
    return np.asarray(raven.render_panel(panel, size).convert("L"), dtype=np.int16)


def test_rendered_candidates_are_distinct_and_pixel_statistics_find_nothing():
    sample = raven.generate_puzzles(300, seed=9)
    ink, spread = [], []
    for p in sample:
        images = [grey(c) for c in p.candidates]
        for i in range(len(images)):
            for j in range(i):
                # Differences anyone can see: dozens of pixels, each by a fifth of the grey range or more.
                assert (np.abs(images[i] - images[j]) >= 51).sum() >= 20, (p.candidates[i], p.candidates[j])
        mean = np.mean(images, axis=0)
        ink.append([float((255 - image).sum()) for image in images])
        spread.append([float(np.abs(image - mean).sum()) for image in images])
    solvers = {
        "most ink": [argmax(v) for v in ink],
        "least ink": [argmax([-x for x in v]) for v in ink],
        "pixel odd one out": [argmax(v) for v in spread],
        "closest to the mean image": [argmax([-x for x in v]) for v in spread],
    }
    for name, picks in solvers.items():
        assert_at_chance(name, picks, sample)


def test_sizes_and_greys_add_as_drawn():
    def radius(size):
        image = grey(raven.Panel((4,), 4, size, 9), 480)
        columns = np.nonzero((image < 128)[240, 20:-20])[0]
        return (columns[-1] - columns[0]) / 2

    for a, b in ((3, 3), (3, 6), (4, 5)):
        assert abs(radius(a) + radius(b) - radius(a + b)) <= 2

    def darkness(colour):
        return 255 - grey(raven.Panel((4,), 4, 9, colour), 480)[240, 240]

    for a, b in ((1, 2), (3, 6), (2, 2)):
        assert abs(darkness(a) + darkness(b) - darkness(a + b)) <= 1


# --- configuration, seeds, the task and its baselines ------------------------------------------------------


def test_rule_checks():
    assert raven.values_explained([[1, 2, 3], [4, 5, 6], [0, 1, 2]])
    assert raven.values_explained([[1, 2, 3], [2, 3, 1], [3, 1, 2]])
    assert raven.values_explained([[1, 2, 3], [4, 1, 5], [2, 2, 4]])
    assert not raven.values_explained([[1, 2, 3], [4, 5, 6], [0, 1, 3]])
    assert raven.positions_explained([[frozenset({0}), frozenset({1}), frozenset({0, 1})]] * 3)


def test_generation_is_seeded():
    assert raven.generate_puzzles(5, seed=3) == raven.generate_puzzles(5, seed=3)
    assert raven.generate_puzzles(5, seed=3) != raven.generate_puzzles(5, seed=4)


@pytest.mark.parametrize("count", [2, 4, 5, 8, 9])
def test_other_candidate_counts(count):
    for puzzle in raven.generate_puzzles(100, seed=count, num_candidates=count):
        assert len(set(puzzle.candidates)) == count
        assert correct_candidates(puzzle) == [puzzle.answer]


def test_impossible_candidate_counts_are_refused():
    for count in (1, 11, 49):
        with pytest.raises(ValueError, match=f"{count} candidates cannot be made"):
            raven.check_candidate_count(count)
    task = load_task("raven_generated", overrides=["data.eval.count=2", "data.eval.candidates=11"])
    with pytest.raises(ConfigError, match="data.eval.candidates: 11 candidates"):
        load_samples(task)


def test_rendered_puzzles_round_trip_through_the_iq50_loader(tmp_path):
    puzzles = raven.generate_puzzles(3, seed=1)
    index = raven.write_puzzles(puzzles, tmp_path, panel_size=64)
    task = load_task("raven_iq50", overrides=[f"data.root={tmp_path}", f"data.eval.annotations={index.name}"])
    samples = load_samples(task)
    assert [s.answer for s in samples] == [p.answer for p in puzzles]
    first = samples[0]
    assert len(first.images["context"]) == 8 and len(first.images["candidate"]) == 6
    assert first.text["count"] == "eight"
    assert (
        load_image(first.images["candidate"][0]).tobytes()
        == raven.render_panel(puzzles[0].candidates[0], 64).tobytes()
    )


def _write_iq50(folder, context_count, candidate_count=6, answer=2):
    names = []
    for i in range(context_count + candidate_count):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    index = [
        {"id": "q1", "context": names[:context_count], "candidates": names[context_count:], "answer": answer}
    ]
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("context_count, word", [(3, "three"), (4, "four"), (8, "eight")])
def test_iq50_layout(tmp_path, context_count, word):
    _write_iq50(tmp_path, context_count)
    [sample] = load_samples(load_task("raven_iq50", overrides=[f"data.root={tmp_path}"]))
    assert len(sample.images["context"]) == context_count and len(sample.images["candidate"]) == 6
    assert sample.text["count"] == word and sample.answer == 2


def test_iq50_bad_puzzles_are_refused(tmp_path):
    _write_iq50(tmp_path, 5)
    with pytest.raises(ConfigError, match="5 context images"):
        load_samples(load_task("raven_iq50", overrides=[f"data.root={tmp_path}"]))
    _write_iq50(tmp_path, 3, answer=9)
    with pytest.raises(ConfigError, match="answer 9"):
        load_samples(load_task("raven_iq50", overrides=[f"data.root={tmp_path}"]))


def test_generated_task_samples():
    task = load_task("raven_generated", overrides=["data.eval.count=4", "data.eval.image_size=48"])
    samples = load_samples(task)
    assert len(samples) == 4 and all(len(s.images["candidate"]) == 6 for s in samples)
    assert load_image(samples[0].images["context"][0]).size == (48, 48)
    puzzles = raven.generate_puzzles(4, seed=task.data.eval.seed)
    assert [s.meta["baselines"] for s in samples] == [raven.baseline_choices(p) for p in puzzles]


class IndifferentBackend:
    """Scores every candidate alike, so the first candidate of each puzzle wins."""

    def generate(self, prompts, decoding, max_new_tokens=None):
        raise AssertionError("ranking tasks generate nothing")

    def log_likelihood(self, prompts, continuations, normalize=False):
        return [0.0] * len(prompts)


def test_results_and_report_give_the_baselines_on_the_same_puzzles(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    source = Path(__file__).parents[1] / "kosmos/configs/eval/raven_generated.yaml"
    (tasks / "raven.yaml").write_text(
        source.read_text().replace("count: 500", "count: 60").replace("image_size: 160", "image_size: 16")
    )
    options = EvalOptions(tasks=["raven"], out=tmp_path / "out", task_dir=tasks, batch_size=60)
    results = evaluate(IndifferentBackend(), options)
    [entry] = results["summary"]
    puzzles = raven.generate_puzzles(60, seed=2024)
    expected = {
        name: 100 * sum(raven.baseline_choices(p)[name] == p.answer for p in puzzles) / 60
        for name in raven.BASELINES
    }
    assert entry["baselines"] == pytest.approx({"chance": 100 / 6, **expected})
    assert entry["value"] == pytest.approx(100 * sum(p.answer == 0 for p in puzzles) / 60)
    assert (
        json.loads((tmp_path / "out/results.json").read_text())["results"][0]["baselines"]
        == entry["baselines"]
    )
    report = (tmp_path / "out/report.md").read_text()
    assert f"- raven: chance 16.67, candidates_only {expected['candidates_only']:.2f}" in report
