from pathlib import Path

import pytest
import torch

from kosmos.eval.datasets import Sample
from kosmos.eval.demos import RandomDemos, RicesDemos, StratifiedDemos, build_selector
from kosmos.eval.prompts import few_shot_prompt, fill
from kosmos.eval.tasks import load_task


def sample(sid, group="g", answer="x", question=None):
    text = {"question": question} if question else {}
    return Sample(
        sid, {"image": [Path(f"{sid}.png")]}, text, references=[answer], meta={"question_type": group}
    )


class PlantedEmbedder:
    """Embeddings looked up by image file stem / text, as planted by the test."""

    def __init__(self, images: dict[str, list[float]], texts: dict[str, list[float]] | None = None):
        self.image_vectors = images
        self.text_vectors = texts or {}

    def images(self, refs):
        return torch.tensor([self.image_vectors[Path(r).stem] for r in refs])

    def texts(self, texts):
        width = len(next(iter(self.image_vectors.values())))
        return torch.tensor([self.text_vectors.get(t, [0.0] * width) for t in texts])


def test_random_demos_are_seeded_per_trial_and_skip_the_query():
    pool = [sample(f"p{i}") for i in range(20)] + [sample("q")]
    selector = RandomDemos(pool, seed=3)
    query = sample("q")
    first = selector.select(query, 4, trial=0)
    assert first == RandomDemos(pool, seed=3).select(query, 4, trial=0)
    assert first != selector.select(query, 4, trial=1)
    for trial in range(10):
        picks = selector.select(query, 20, trial)
        assert len(set(picks)) == 20 and pool.index(query) not in picks
    with pytest.raises(ValueError, match="pool has 20"):
        selector.select(query, 21)


def test_rices_picks_nearest_neighbours_most_similar_last():
    # Pool vectors at known angles from the query direction (1, 0): similarity falls with the index.
    angles = torch.linspace(0, 3.0, 12)
    pool_vectors = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    pool = [sample(f"p{int(i)}") for i in order]
    selector = RicesDemos(pool, pool_vectors[order] * 3.0, {"q": torch.tensor([2.0, 0.0])})
    picks = selector.select(sample("q"), 4)
    assert [pool[i].id for i in picks] == ["p3", "p2", "p1", "p0"]


def test_rices_through_build_selector_with_an_embedder():
    pool = [sample("a"), sample("b"), sample("c"), sample("d")]
    embedder = PlantedEmbedder({"a": [1, 0], "b": [0, 1], "c": [0.9, 0.1], "d": [-1, 0], "q": [1, 0.05]})
    selector = build_selector("rices", pool, [sample("q")], embedder)
    assert [pool[i].id for i in selector.select(sample("q"), 2)] == ["c", "a"]


def test_stratified_draws_across_groups():
    # Group "near" holds the three most similar candidates; round robin still takes from "far" too.
    pool = [
        sample("n1", "near"),
        sample("n2", "near"),
        sample("n3", "near"),
        sample("f1", "far"),
        sample("f2", "far"),
    ]
    images = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.5, 0.5], [0.0, 1.0]])
    selector = StratifiedDemos(
        pool,
        images,
        torch.zeros(5, 2),
        {"q": torch.tensor([1.0, 0.0])},
        {"q": None},
        [s.meta["question_type"] for s in pool],
    )
    picks = [pool[i].id for i in selector.select(sample("q"), 3)]
    assert set(picks) == {"n1", "n2", "f1"}
    assert picks[-1] == "n1"  # the most similar last


def test_stratified_uses_text_and_cross_modal_similarity():
    embedder = PlantedEmbedder(
        {"a": [1, 0, 0], "b": [1, 0, 0], "q": [1, 0, 0]},
        {"what colour? blue": [0, 1, 0], "what colour?": [0, 1, 0]},
    )
    pool = [
        sample("a", answer="red", question="what colour?"),
        sample("b", answer="blue", question="what colour?"),
    ]
    query = sample("q", question="what colour?")
    selector = build_selector("stratified", pool, [query], embedder, group_key="question_type")
    # Equal images: the candidate whose question and answer text match the query's text wins.
    assert [pool[i].id for i in selector.select(query, 1)] == ["b"]


@pytest.mark.parametrize("scheme", ["random", "rices", "stratified"])
def test_few_shot_prompts_hold_the_right_images_in_order(scheme):
    task = load_task("vqav2")
    pool = [
        sample(f"p{i}", group=f"t{i % 3}", answer=f"answer{i}", question=f"question {i}?") for i in range(9)
    ]
    queries = [sample("q0", question="what?"), sample("q1", question="why?")]
    vectors = {f"p{i}": [1.0, float(i)] for i in range(9)} | {"q0": [1.0, 2.0], "q1": [1.0, 7.0]}
    selector = build_selector(scheme, pool, queries, PlantedEmbedder(vectors), group_key="question_type")
    for query in queries:
        chosen = [pool[i] for i in selector.select(query, 4)]
        prompt = few_shot_prompt(task, query, chosen)
        images = [p for p in prompt if not isinstance(p, str)]
        texts = [p for p in prompt if isinstance(p, str)]
        assert images == [Path(f"{d.id}.png") for d in chosen] + [Path(f"{query.id}.png")]
        assert texts == [f"Question: {d.text['question']} Answer: {d.target}" for d in chosen] + [
            f"Question: {query.text['question']} Answer:"
        ]


def test_fill_places_images_and_text():
    s = Sample("x", {"context": [Path("c1"), Path("c2")], "candidate": [Path("z")]}, {"count": "two"})
    parts = fill(
        "Here are {count} images:{context}The following image is:{candidate}Is it correct?",
        s,
        {"candidate": [Path("picked")]},
    )
    assert parts == [
        "Here are two images:",
        Path("c1"),
        Path("c2"),
        "The following image is:",
        Path("picked"),
        "Is it correct?",
    ]
