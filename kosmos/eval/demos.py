"""Few-shot demonstration selection: random, RICES and stratified cross-modal retrieval.

A selector picks, for one query, the indices of demonstrations in the task's demo pool, in prompt
order (the demonstrations are placed before the query in that order). A pool sample with the query's
id is never its own demonstration.
- random: a seeded draw per (trial, query), so a trial is reproducible and independent of sharding;
- rices (Yang et al. 2022, as in Flamingo): the pool images most similar to the query image under a
  CLIP image embedding, the most similar placed last, nearest the query;
- stratified: every pool sample is scored by image-image, text-text and image-text similarity to the
  query (CLIP embeddings), and demonstrations are drawn round-robin across groups (question types,
  classes) in order of each group's best score, so one kind of question cannot fill every slot.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
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


class RicesDemos:
    """Nearest pool images by cosine similarity of (CLIP) image embeddings."""

    def __init__(
        self, pool: Sequence[Sample], pool_images: torch.Tensor, query_images: dict[str, torch.Tensor]
    ):
        self.pool_ids = [s.id for s in pool]
        self.pool_images = _normalize(pool_images)
        self.query_images = query_images

    def select(self, query: Sample, shots: int, trial: int = 0) -> list[int]:
        similarity = self.pool_images @ _normalize(self.query_images[query.id])
        for i, pid in enumerate(self.pool_ids):
            if pid == query.id:
                similarity[i] = float("-inf")
        nearest = torch.topk(similarity, shots).indices.tolist()  # most similar first
        return nearest[::-1]


class StratifiedDemos:
    """Cross-modal similarity (image-image, text-text, image-text), drawn across groups."""

    def __init__(
        self,
        pool: Sequence[Sample],
        pool_images: torch.Tensor,
        pool_texts: torch.Tensor,
        query_images: dict[str, torch.Tensor],
        query_texts: dict[str, torch.Tensor | None],
        groups: Sequence[str],
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ):
        self.pool_ids = [s.id for s in pool]
        self.pool_images = _normalize(pool_images)
        self.pool_texts = _normalize(pool_texts)
        self.query_images = query_images
        self.query_texts = query_texts
        self.groups = list(groups)
        self.weights = weights

    def scores(self, query: Sample) -> torch.Tensor:
        image = _normalize(self.query_images[query.id])
        w_image, w_text, w_cross = self.weights
        score = w_image * (self.pool_images @ image) + w_cross * (self.pool_texts @ image)
        text = self.query_texts.get(query.id)
        if text is not None:  # captioning queries have no text of their own
            score = score + w_text * (self.pool_texts @ _normalize(text))
        for i, pid in enumerate(self.pool_ids):
            if pid == query.id:
                score[i] = float("-inf")
        return score

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
    parts = [v for k, v in sample.text.items() if k != "count"]
    if with_answer:
        parts.append(sample.target)
    return " ".join(parts)


def first_image(sample: Sample) -> ImageRef:
    for refs in sample.images.values():
        if refs:
            return refs[0]
    raise ConfigError(f"sample {sample.id} has no image for retrieval")


class ClipEmbedder:
    """An open_clip model from a local weights file (nothing is downloaded)."""

    def __init__(
        self, model_name: str, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 64
    ):
        import open_clip

        if not Path(weights).is_file():
            raise ConfigError(
                f"retrieval CLIP weights {weights} do not exist (a local open_clip checkpoint is needed)"
            )
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(weights)
        )
        self.model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self.batch_size = batch_size
        self.name = f"{model_name}:{weights}"

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
    pool_images = embedder.images([first_image(s) for s in pool])
    query_images = dict(zip([q.id for q in queries], embedder.images([first_image(q) for q in queries])))
    if scheme == "rices":
        return RicesDemos(pool, pool_images, query_images)
    pool_texts = embedder.texts([sample_text(s, with_answer=True) for s in pool])
    query_strings = [sample_text(q, with_answer=False) for q in queries]
    with_text = [q for q, t in zip(queries, query_strings) if t]
    embedded = embedder.texts([t for t in query_strings if t]) if with_text else []
    query_texts: dict[str, torch.Tensor | None] = {q.id: None for q in queries}
    query_texts.update(zip([q.id for q in with_text], embedded))
    groups = [str(s.meta.get(group_key, "")) if group_key else "" for s in pool]
    return StratifiedDemos(pool, pool_images, pool_texts, query_images, query_texts, groups)
