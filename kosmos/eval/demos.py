"""Few-shot demonstration selection: random, RICES and stratified cross-modal retrieval.

A selector picks, for one query, the indices of demonstrations in the task's demo pool, in prompt
order (the demonstrations are placed before the query in that order). A pool sample with the query's
id is never its own demonstration.
- random: a seeded draw per (trial, query), so a trial is reproducible and independent of sharding;
- rices (Yang et al. 2022, as in Flamingo): the pool samples whose images are most similar to the
  query image under a CLIP image embedding, the most similar placed last, nearest the query. Where a
  side has no image (ScienceQA problems without one), its text stands in: a query image is compared
  with a pool sample's text, a query's text with the pool images (or texts);
- stratified: every pool sample is scored by the mean of the similarities both sides have: image to
  image, text to text, and across modalities in both directions (query image to pool text, query text
  to pool image); demonstrations are drawn round-robin across groups (question types, classes) in
  order of each group's best score, so one kind of question cannot fill every slot.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kosmos.config import ConfigError
from kosmos.eval.datasets import ImageRef, Sample, load_image

SCHEMES = ("random", "rices", "stratified")


class RandomDemos:
    def __init__(self, pool: Sequence[Sample], seed: int = 0):
        self.pool_ids = [s.id for s in pool]
        self.seed = seed

    def select(self, query: Sample, shots: int, trial: int = 0) -> list[int]:
        rng = random.Random(f"{self.seed}/{trial}/{query.id}")
        allowed = [i for i, pid in enumerate(self.pool_ids) if pid != query.id]
        if shots > len(allowed):
            raise ValueError(f"{shots} demonstrations asked for but the pool has {len(allowed)}")
        return rng.sample(allowed, shots)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@dataclass
class Embedded:
    """Unit-length CLIP embeddings of samples, one row each; zeros where a sample lacks the modality."""

    images: torch.Tensor  # [N, D]
    has_image: torch.Tensor  # [N] bool
    texts: torch.Tensor  # [N, D]
    has_text: torch.Tensor  # [N] bool

    @classmethod
    def of(
        cls,
        images: Sequence[torch.Tensor | None],
        texts: Sequence[torch.Tensor | None],
    ) -> Embedded:
        width = next(v.shape[-1] for v in (*images, *texts) if v is not None)

        def stack(vectors):
            rows = [_normalize(v) if v is not None else torch.zeros(width) for v in vectors]
            return torch.stack(rows), torch.tensor([v is not None for v in vectors])

        return cls(*stack(images), *stack(texts))


class _Retrieval:
    """Shared by the retrieval schemes: the pool's and the queries' embeddings."""

    def __init__(
        self, pool: Sequence[Sample], pool_embedded: Embedded, queries: Sequence[Sample], embedded: Embedded
    ):
        self.pool_row = {s.id: i for i, s in enumerate(pool)}  # ids are unique within a split
        self.pool = pool_embedded
        self.row = {q.id: i for i, q in enumerate(queries)}
        self.queries = embedded

    def _query(self, query: Sample) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        i = self.row[query.id]
        image = self.queries.images[i] if self.queries.has_image[i] else None
        text = self.queries.texts[i] if self.queries.has_text[i] else None
        return image, text

    def _exclude_self(self, score: torch.Tensor, query: Sample) -> torch.Tensor:
        if query.id in self.pool_row:
            score[self.pool_row[query.id]] = float("-inf")
        return score


class RicesDemos(_Retrieval):
    """Nearest pool samples by image similarity, with text standing in for a missing image."""

    def scores(self, query: Sample) -> torch.Tensor:
        image, text = self._query(query)
        vector = image if image is not None else text
        score = torch.where(self.pool.has_image, self.pool.images @ vector, self.pool.texts @ vector)
        return self._exclude_self(score, query)

    def select(self, query: Sample, shots: int, trial: int = 0) -> list[int]:
        nearest = torch.topk(self.scores(query), shots).indices.tolist()  # most similar first
        return nearest[::-1]


class StratifiedDemos(_Retrieval):
    """Mean of the image-image, text-text and cross-modal similarities, drawn across groups."""

    def __init__(self, pool, pool_embedded, queries, embedded, groups: Sequence[str]):
        super().__init__(pool, pool_embedded, queries, embedded)
        self.groups = list(groups)

    def scores(self, query: Sample) -> torch.Tensor:
        image, text = self._query(query)
        total = torch.zeros(len(self.pool_row))
        count = torch.zeros(len(self.pool_row))
        for vector in (image, text):
            if vector is None:
                continue
            for pool_vectors, present in (
                (self.pool.images, self.pool.has_image),
                (self.pool.texts, self.pool.has_text),
            ):
                total += present * (pool_vectors @ vector)
                count += present
        return self._exclude_self(total / count.clamp(min=1), query)

    def select(self, query: Sample, shots: int, trial: int = 0) -> list[int]:
        score = self.scores(query)
        ranked: dict[str, list[int]] = {}
        for i in torch.argsort(score, descending=True).tolist():
            if score[i] > float("-inf"):
                ranked.setdefault(self.groups[i], []).append(i)
        chosen: list[int] = []
        while len(chosen) < shots and any(ranked.values()):
            for members in list(ranked.values()):  # groups in order of their best remaining member
                if members and len(chosen) < shots:
                    chosen.append(members.pop(0))
            ranked = dict(
                sorted(((g, m) for g, m in ranked.items() if m), key=lambda gm: -float(score[gm[1][0]]))
            )
        return sorted(chosen, key=lambda i: float(score[i]))  # the most similar last


# --- embeddings --------------------------------------------------------------------------------------


def sample_text(sample: Sample, with_answer: bool) -> str:
    """What text retrieval compares: the sample's text fields, plus its answer for a demonstration."""
    parts = [v for k, v in sample.text.items() if k != "count" and v]
    if with_answer:
        parts.append(sample.target)
    return " ".join(parts)


def first_image(sample: Sample) -> ImageRef | None:
    return next((refs[0] for refs in sample.images.values() if refs), None)


def check_demos(
    scheme: str, pool: Sequence[Sample], queries: Sequence[Sample], shots: int, where: str
) -> None:
    """Stop before any compute when `scheme` cannot give every query `shots` demonstrations."""
    pool_ids = {s.id for s in pool}
    for query in queries:
        available = len(pool) - (query.id in pool_ids)  # a query is never its own demonstration
        if shots > available:
            raise ConfigError(f"{where}: {shots} demonstrations asked for but the demo pool has {available}")
        if scheme != "random" and first_image(query) is None and not sample_text(query, with_answer=False):
            raise ConfigError(f"{where}: sample {query.id} has neither an image nor text to retrieve by")


class ClipEmbedder:
    """An open_clip model from a local weights file (nothing is downloaded)."""

    def __init__(
        self, model_name: str, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 64
    ):
        import open_clip

        self.check(model_name, weights)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(weights)
        )
        self.model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self.batch_size = batch_size
        self.name = f"{model_name}:{weights}"

    @staticmethod
    def check(model_name: str, weights: str | Path | None) -> None:
        """The options are usable: a model open_clip knows and a local weights file."""
        import open_clip

        if model_name not in open_clip.list_models():
            raise ConfigError(f"--retrieval-clip: open_clip has no model {model_name!r}")
        if weights is None or not Path(weights).is_file():
            raise ConfigError(
                f"--retrieval-weights: {weights} is not a file (a local open_clip checkpoint is needed)"
            )

    @torch.no_grad()
    def images(self, refs: Sequence[ImageRef]) -> torch.Tensor:
        out = []
        for start in range(0, len(refs), self.batch_size):
            batch = torch.stack(
                [self.preprocess(load_image(r)) for r in refs[start : start + self.batch_size]]
            )
            out.append(self.model.encode_image(batch.to(self.device)).float().cpu())
        return _normalize(torch.cat(out))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        return _normalize(torch.cat(out))


def _embed(embedder, samples: Sequence[Sample], with_answer: bool, texts_for: Sequence[bool]) -> Embedded:
    """Images where the samples have one; texts where `texts_for` asks (and there is text)."""
    refs = [first_image(s) for s in samples]
    with_image = [i for i, r in enumerate(refs) if r is not None]
    image_rows = embedder.images([refs[i] for i in with_image]) if with_image else []
    images: list[torch.Tensor | None] = [None] * len(samples)
    for i, row in zip(with_image, image_rows):
        images[i] = row
    strings = [sample_text(s, with_answer) if wanted else "" for s, wanted in zip(samples, texts_for)]
    with_text = [i for i, t in enumerate(strings) if t]
    text_rows = embedder.texts([strings[i] for i in with_text]) if with_text else []
    texts: list[torch.Tensor | None] = [None] * len(samples)
    for i, row in zip(with_text, text_rows):
        texts[i] = row
    return Embedded.of(images, texts)


def build_selector(
    scheme: str,
    pool: Sequence[Sample],
    queries: Sequence[Sample],
    embedder=None,
    group_key: str | None = None,
    seed: int = 0,
):
    """The selector for `scheme`; retrieval schemes embed the pool and the queries with `embedder`
    (anything with `images(refs)` and `texts(strings)` returning one row per input)."""
    if scheme == "random":
        return RandomDemos(pool, seed)
    if scheme not in SCHEMES:
        raise ConfigError(f"--demos: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if embedder is None:
        raise ConfigError(
            f"--demos {scheme}: needs a CLIP model for retrieval (--retrieval-clip and --retrieval-weights)"
        )
    if scheme == "rices":
        # Texts only stand in for missing images (and a query without an image is compared by its text).
        pool_embedded = _embed(embedder, pool, True, [first_image(s) is None for s in pool])
        query_embedded = _embed(embedder, queries, False, [first_image(q) is None for q in queries])
        return RicesDemos(pool, pool_embedded, queries, query_embedded)
    pool_embedded = _embed(embedder, pool, True, [True] * len(pool))
    query_embedded = _embed(embedder, queries, False, [True] * len(queries))
    groups = [str(s.meta.get(group_key, "")) if group_key else "" for s in pool]
    return StratifiedDemos(pool, pool_embedded, queries, query_embedded, groups)
