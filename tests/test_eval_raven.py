import json
from collections import Counter

import pytest
from PIL import Image

from kosmos.config import ConfigError
from kosmos.eval import raven
from kosmos.eval.datasets import load_image, load_samples
from kosmos.eval.tasks import load_task

PUZZLES = raven.generate_puzzles(400, seed=7)


def most_common_value_guess(candidates):
    """The candidates-only shortcut that breaks the original RAVEN: the candidate whose attribute
    values are the most common among the candidates (first one on ties)."""
    keys = [
        lambda p: p.positions,
        lambda p: p.number,
        lambda p: p.shape,
        lambda p: p.size,
        lambda p: p.colour,
    ]
    counts = [Counter(key(p) for p in candidates) for key in keys]
    scores = [sum(count[key(p)] for key, count in zip(keys, counts)) for p in candidates]
    return scores.index(max(scores))


def test_exactly_one_candidate_is_correct():
    for puzzle in PUZZLES:
        correct = [raven.candidate_is_correct(puzzle.context, c) for c in puzzle.candidates]
        assert correct.count(True) == 1
        assert correct[puzzle.answer]
        assert len(set(puzzle.candidates)) == 8


def test_answers_uniformly_placed():
    counts = Counter(p.answer for p in PUZZLES)
    assert set(counts) == set(range(8))
    # 400 draws over 8 places: about 50 each, a few standard deviations either way.
    assert all(25 <= n <= 75 for n in counts.values())


def test_candidates_alone_do_not_reveal_the_answer():
    hits = sum(most_common_value_guess(p.candidates) == p.answer for p in PUZZLES)
    assert abs(hits / len(PUZZLES) - 1 / 8) < 0.06
    # The reason: every attribute value is shared by 0, 4 or 8 of the candidates.
    for puzzle in PUZZLES[:50]:
        for key in ("positions", "shape", "size", "colour"):
            assert set(Counter(getattr(c, key) for c in puzzle.candidates).values()) <= {4, 8}


def test_every_rule_is_used():
    used = Counter(
        rule.split()[-2] if name == "layout" else rule.split()[0]
        for p in PUZZLES
        for name, rule in p.rules.items()
    )
    assert {"constant", "progression", "arithmetic", "distribute_three"} <= set(used)
    layouts = Counter(p.rules["layout"].split()[0] for p in PUZZLES)
    assert set(layouts) == {"number", "position"}


def test_rule_checks():
    assert raven.values_explained([[1, 2, 3], [4, 5, 6], [0, 1, 2]])
    assert raven.values_explained([[1, 2, 3], [2, 3, 1], [3, 1, 2]])
    assert raven.values_explained([[1, 2, 3], [4, 1, 5], [2, 2, 4]])
    assert not raven.values_explained([[1, 2, 3], [4, 5, 6], [0, 1, 3]])
    assert raven.positions_explained([[frozenset({0}), frozenset({1}), frozenset({0, 1})]] * 3)


def test_generation_is_seeded():
    assert raven.generate_puzzles(5, seed=3) == raven.generate_puzzles(5, seed=3)
    assert raven.generate_puzzles(5, seed=3) != raven.generate_puzzles(5, seed=4)


def test_rendered_panels_differ_and_round_trip_through_the_iq50_loader(tmp_path):
    puzzles = raven.generate_puzzles(3, seed=1)
    rendered = [raven.render_panel(c, 64).tobytes() for c in puzzles[0].candidates]
    assert len(set(rendered)) == 8
    index = raven.write_puzzles(puzzles, tmp_path, panel_size=64)
    task = load_task("raven_iq50", overrides=[f"data.root={tmp_path}", f"data.eval.annotations={index.name}"])
    samples = load_samples(task)
    assert [s.answer for s in samples] == [p.answer for p in puzzles]
    first = samples[0]
    assert len(first.images["context"]) == 8 and len(first.images["candidate"]) == 8
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
    assert len(samples) == 4
    assert load_image(samples[0].images["context"][0]).size == (48, 48)
