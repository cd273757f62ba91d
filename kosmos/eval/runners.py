"""Task runners: from a batch of samples (and their demonstrations) to per-sample prediction records.

- generate: the model writes the answer (captioning with beam search, VQA greedily, free classification);
- rank_choices: every option is scored as a continuation of the prompt and the likeliest wins
  (classification over class names, multiple choice, Rendered SST-2);
- rank_images: each candidate image is put into the prompt in turn and the candidate after which the
  target (Raven's "Yes") is likeliest wins.
With `prompt.rationale` set, a first stage generates a rationale for each sample (multimodal
chain-of-thought) and the second stage reads it through `{rationale}`.
A record is JSON: the sample's id, what the metrics compare (references, choices, answer, meta), the
prediction, and the scores or rationale that led to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kosmos.eval.datasets import Sample
from kosmos.eval.prompts import few_shot_prompt, fill
from kosmos.eval.tasks import TaskConfig


def sample_fields(sample: Sample) -> dict:
    """What a record holds of its sample: what the metrics compare the prediction with."""
    record = {
        "id": sample.id,
        "references": sample.references,
        "choices": sample.choices,
        "meta": sample.meta,
    }
    if sample.answer is not None:
        record["answer"] = sample.answer
    return record


def _rationales(task: TaskConfig, backend, samples: Sequence[Sample]) -> list[str | None]:
    if task.prompt.rationale is None:
        return [None] * len(samples)
    prompts = [fill(task.prompt.rationale, s) for s in samples]
    return backend.generate(prompts, task.decoding, max_new_tokens=task.decoding.rationale_max_new_tokens)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def run_batch(
    task: TaskConfig, backend, samples: Sequence[Sample], demos: Sequence[Sequence[Sample]]
) -> list[dict]:
    """Prediction records for `samples`; `demos[i]` are sample i's demonstrations, in prompt order."""
    records = [sample_fields(s) for s in samples]
    rationales = _rationales(task, backend, samples)
    extras = [{} if r is None else {"rationale": r} for r in rationales]
    for record, rationale in zip(records, rationales):
        if rationale is not None:
            record["rationale"] = rationale

    if task.kind == "generate":
        prompts = [few_shot_prompt(task, s, d, e) for s, d, e in zip(samples, demos, extras)]
        for record, text in zip(records, backend.generate(prompts, task.decoding)):
            record["prediction"] = text
        return records

    # Ranking: one scored (prompt, continuation) pair per option, flattened over the batch.
    prompts, continuations, owners = [], [], []
    for n, (sample, sample_demos, extra) in enumerate(zip(samples, demos, extras)):
        if task.kind == "rank_choices":
            prompt = few_shot_prompt(task, sample, sample_demos, extra)
            for choice in sample.choices:
                prompts.append(prompt)
                continuations.append(choice)
                owners.append(n)
        else:
            for candidate in sample.images["candidate"]:
                prompts.append(
                    few_shot_prompt(task, sample, sample_demos, {**extra, "candidate": [candidate]})
                )
                continuations.append(task.prompt.target)
                owners.append(n)
    scores = backend.log_likelihood(prompts, continuations, normalize=task.decoding.length_normalize)
    per_sample: list[list[float]] = [[] for _ in samples]
    for owner, score in zip(owners, scores):
        per_sample[owner].append(score)
    for record, values in zip(records, per_sample):
        record["scores"] = values
        record["prediction"] = _argmax(values)
    return records
