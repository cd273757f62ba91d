import json
import zlib
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from PIL import Image

from kosmos.config import ConfigError
from kosmos.eval.datasets import Sample
from kosmos.eval.demos import Embedded, RandomDemos, RicesDemos, StratifiedDemos, build_selector
from kosmos.eval.harness import EvalOptions, evaluate, prepare_tasks
from kosmos.eval.prompts import DEMO_END, few_shot_prompt, fill, is_image
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
    pool_embedded = Embedded.of(list(pool_vectors[order] * 3.0), [None] * 12)
    query_embedded = Embedded.of([torch.tensor([2.0, 0.0])], [None])
    selector = RicesDemos(pool, pool_embedded, [sample("q")], query_embedded)
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
        Embedded.of(list(images), [None] * 5),
        [sample("q")],
        Embedded.of([torch.tensor([1.0, 0.0])], [None]),
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


def bare(sid, answer="x", question=None, group="g"):
    """A sample without an image (a ScienceQA problem with no picture)."""
    text = {"question": question} if question else {}
    return Sample(sid, {"image": []}, text, references=[answer], meta={"question_type": group})


def test_rices_compares_text_where_an_image_is_missing():
    embedder = PlantedEmbedder(
        {"a": [1, 0, 0], "q": [1, 0, 0], "b": [0, 0, 1]},
        {"what is it? near": [0.9, 0.1, 0], "what is it? far": [0, 1, 0], "what is it?": [0, 0, 1]},
    )
    pool = [sample("a"), bare("n", "near", "what is it?"), bare("f", "far", "what is it?"), sample("b")]
    with_image, without = sample("q"), bare("t", question="what is it?")
    selector = build_selector("rices", pool, [with_image, without], embedder)
    # The query image against pool images, and against the texts of the pool samples without one.
    assert [pool[i].id for i in selector.select(with_image, 2)] == ["n", "a"]
    # A query without an image is compared by its text, with pool images and texts alike.
    assert [pool[i].id for i in selector.select(without, 1)] == ["b"]


def test_stratified_compares_across_modalities_in_both_directions():
    # Only the query text against the pool images tells the candidates apart ...
    embedder = PlantedEmbedder(
        {"a": [0, 1, 0], "b": [0, 0, 1], "q": [1, 0, 0]},
        {"which? x": [1, 0, 0], "which?": [0, 1, 0]},
    )
    pool = [sample("a", answer="x", question="which?"), sample("b", answer="x", question="which?")]
    query = sample("q", question="which?")
    selector = build_selector("stratified", pool, [query], embedder)
    assert [pool[i].id for i in selector.select(query, 1)] == ["a"]
    # ... and here only the query image against the pool texts.
    embedder = PlantedEmbedder(
        {"a": [0, 0, 1], "b": [0, 0, 1], "q": [1, 0, 0]},
        {"which? near": [1, 0, 0], "which? far": [0, 1, 0], "which?": [0, 0, 0]},
    )
    pool = [sample("a", answer="far", question="which?"), sample("b", answer="near", question="which?")]
    selector = build_selector("stratified", pool, [query], embedder)
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
        images = [p for p in prompt if is_image(p)]
        texts = [p for p in prompt if isinstance(p, str)]
        assert images == [Path(f"{d.id}.png") for d in chosen] + [Path(f"{query.id}.png")]
        # Every demonstration is image, text and its end.
        assert prompt[: 3 * len(chosen)] == [x for d in chosen for x in (Path(f"{d.id}.png"), ANY, DEMO_END)]
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


class HashEmbedder:
    """Deterministic vectors from a problem's folder name (images) or the text itself."""

    def _vector(self, key: str) -> list[float]:
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return torch.randn(8, generator=generator).tolist()

    def images(self, refs):
        return torch.tensor([self._vector(Path(r).parent.name) for r in refs])

    def texts(self, texts):
        return torch.tensor([self._vector(t) for t in texts])


class FirstChoice:
    """Ranks the first option highest; keeps every prompt it saw."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, decoding, max_new_tokens=None):
        raise AssertionError("ScienceQA ranks options")

    def log_likelihood(self, prompts, continuations, normalize=False):
        self.prompts.extend(prompts)
        return [0.0 if c == "option a" else -1.0 for c in continuations]


def write_scienceqa(root: Path) -> None:
    problems = {}
    for n in range(10):
        pid, split = str(100 + n), "test" if n < 4 else "train"
        image = "image.png" if n % 2 else None  # every other problem has no image
        if image:
            folder = root / "images" / split / pid
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), (20 * n, 0, 0)).save(folder / image)
        problems[pid] = {
            "question": f"Question number {n}?",
            "choices": ["option a", "option b"],
            "answer": n % 2,
            "hint": "" if n % 3 else f"Context {n}.",
            "image": image,
            "subject": "natural science",
            "grade": "grade3",
            "split": split,
        }
    (root / "problems.json").write_text(json.dumps(problems))


@pytest.mark.parametrize("scheme", ["rices", "stratified"])
def test_scienceqa_retrieval_with_and_without_images(tmp_path, scheme):
    write_scienceqa(tmp_path / "scienceqa")
    options = EvalOptions(
        tasks=["scienceqa"], out=tmp_path / "out", data_root=tmp_path, shots=[0, 2], demos=scheme
    )
    backend = FirstChoice()
    results = evaluate(backend, options, embedder=HashEmbedder())
    values = {r["shots"]: r["value"] for r in results["results"]}
    assert values == {0: 50.0, 2: 50.0}
    records = [
        json.loads(line)
        for line in (tmp_path / "out/predictions/scienceqa" / scheme / "2shot_trial0/predictions.jsonl")
        .read_text()
        .splitlines()
    ]
    assert len(records) == 4 and all(len(r["demos"]) == 2 for r in records)
    # Demonstrations come from the train problems, with or without images.
    assert {d for r in records for d in r["demos"]} <= {str(100 + n) for n in range(4, 10)}
    imageless = [p for p in backend.prompts if DEMO_END in p and not any(is_image(x) for x in p)]
    assert imageless  # some few-shot prompts hold no image at all


def test_too_many_shots_stop_before_any_compute(tmp_path):
    write_scienceqa(tmp_path / "scienceqa")
    options = EvalOptions(tasks=["scienceqa"], out=tmp_path / "out", data_root=tmp_path, shots=[7])
    with pytest.raises(ConfigError, match="7 demonstrations asked for but the demo pool has 6"):
        prepare_tasks(options)
