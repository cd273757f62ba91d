"""Multimodal chain-of-thought on ScienceQA at test time (the Multimodal-CoT recipe, docs/mmcot.md).

`generate_rationales`: the stage-1 model writes a rationale for each problem (scored by ROUGE-L against
the lecture and solution). `answer_problems`: the stage-2 model reads each problem with its rationale,
looked up by problem id, and writes `The answer is (X).` (or, for the one-stage baseline, answers
without one). An answer that names none of the options counts as wrong; nothing is guessed.

Each command keeps its records in `OUT/predictions.jsonl`, appended batch by batch, each under the
hash of what decides it (the checkpoint's step and weights, the stage, the token budget and the prompt
with its rationale and image contents; `kosmos.eval.cache`): an interrupted run continues where it
stopped, and a rerun after a change runs again exactly the problems it affects. `OUT/results.json`
and `OUT/report.md` hold the scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from kosmos.config import ConfigError
from kosmos.data.scienceqa import (
    Problem,
    gold_rationale,
    missing_images,
    parse_answer,
    prompt_parts,
    rationales_for,
    read_rationales,
)
from kosmos.eval.backend import layout_prompt
from kosmos.eval.cache import (
    CheckpointIdentity,
    ImageHashes,
    PredictionCache,
    describe_prompt,
    prediction_key,
)
from kosmos.eval.harness import cached_records
from kosmos.eval.metrics import bootstrap_ci, compute_metrics
from kosmos.eval.tasks import DecodingConfig


def check_problems(problems: Sequence[Problem], split: str) -> None:
    """Before any compute: there are problems to run and all their images exist."""
    if not problems:
        raise ConfigError(f"--split: {split} holds no problems")
    missing = missing_images(list(problems))
    if missing:
        raise ConfigError(f"--data: {len(missing)} image file(s) missing, first: {missing[0]}")


def prompts_of(stage: str, rationales: dict[str, str] | None = None) -> Callable[[Problem], list]:
    """The prompt of a problem at `stage`: `rationale`, `answer` (reading its rationale in
    `rationales`, by problem id) or `direct`."""
    if stage == "answer":
        return lambda problem: prompt_parts(problem, "answer", rationales[problem.pid])
    return lambda problem: prompt_parts(problem, stage)


def rationales_by_pid(problems: Sequence[Problem], path: Path) -> dict[str, str]:
    """Each problem's rationale from stage-1 records (joined by problem id; one missing stops)."""
    texts = rationales_for(list(problems), read_rationales(path), str(path))
    return {problem.pid: text for problem, text in zip(problems, texts, strict=True)}


def check_room(
    problems: Sequence[Problem], prompt: Callable[[Problem], list], tokenizer, model_cfg, max_new_tokens: int
) -> None:
    """Before the model loads: the longest prompt and `max_new_tokens` fit in the model's positions."""
    num_image_tokens = model_cfg.connector.num_queries
    longest = max(len(layout_prompt(tokenizer, num_image_tokens, prompt(p))) for p in problems)
    positions = model_cfg.text.max_positions
    if longest + max_new_tokens > positions:
        room = f"at most {positions - longest} fit" if longest < positions else "the prompt alone fills them"
        raise ConfigError(
            f"--max-new-tokens: {max_new_tokens} new tokens after the longest prompt ({longest} tokens) "
            f"exceed the model's {positions} positions ({room})"
        )


def _run(
    backend,
    problems: Sequence[Problem],
    out: Path,
    context: dict,
    prompt: Callable[[Problem], list],
    record: Callable[[Problem, str], dict],
    batch_size: int,
) -> list[dict]:
    """One record per problem, generating only for those the cache does not hold under their key
    (the harness's cached loop)."""
    cache = PredictionCache(out)
    images = ImageHashes()
    decoding = DecodingConfig(strategy="greedy", max_new_tokens=context["max_new_tokens"])

    def keys() -> dict[str, str]:
        return {p.pid: prediction_key(context, describe_prompt(prompt(p), images)) for p in problems}

    def predict_batch(batch: list[Problem]) -> list[dict]:
        texts = backend.generate([prompt(p) for p in batch], decoding)
        return [record(p, text) for p, text in zip(batch, texts, strict=True)]

    label = f"kosmos mmcot: {context['stage']}"
    done = cached_records(cache, {p.pid: p for p in problems}, keys, predict_batch, batch_size, label)
    records = [done[p.pid] for p in problems]
    cache.rewrite(records)
    return records


def _context(stage: str, checkpoint: CheckpointIdentity | None, max_new_tokens: int) -> dict:
    return {
        "stage": stage,
        "checkpoint": checkpoint.key if checkpoint is not None else None,
        "max_new_tokens": max_new_tokens,
    }


def generate_rationales(
    backend,
    problems: Sequence[Problem],
    out: Path,
    checkpoint: CheckpointIdentity | None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
) -> list[dict]:
    """Stage 1: `{"id", "prediction" (the rationale), "references" ([gold] or [])}` per problem.
    `checkpoint` identifies the weights (`kosmos.eval.cache.checkpoint_identity`) in the cache keys."""

    def record(problem: Problem, text: str) -> dict:
        gold = gold_rationale(problem)
        return {"id": problem.pid, "prediction": text, "references": [gold] if gold else []}

    context = _context("rationale", checkpoint, max_new_tokens)
    return _run(backend, problems, out, context, prompts_of("rationale"), record, batch_size)


def answer_problems(
    backend,
    problems: Sequence[Problem],
    out: Path,
    checkpoint: CheckpointIdentity | None,
    rationales: Path | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> list[dict]:
    """Stage 2 with the rationales of `rationales` (stage-1 records, joined by problem id), or the
    one-stage baseline without. Records carry the generated text, the option it names (`choice`,
    -1 when it names none), the right `answer`, and the metadata the breakdown groups by."""
    by_pid = rationales_by_pid(problems, rationales) if rationales is not None else None
    stage = "direct" if rationales is None else "answer"

    def record(problem: Problem, text: str) -> dict:
        choice = parse_answer(text, len(problem.choices))
        out = {
            "id": problem.pid,
            "prediction": text,
            "choice": -1 if choice is None else choice,
            "answer": problem.answer,
            "choices": problem.choices,
            "meta": problem.meta,
        }
        if by_pid is not None:
            out["rationale"] = by_pid[problem.pid]
        return out

    context = _context(stage, checkpoint, max_new_tokens)
    return _run(backend, problems, out, context, prompts_of(stage, by_pid), record, batch_size)


def score_answers(records: Sequence[dict], seed: int = 0) -> dict:
    """Accuracy (percent) overall with a bootstrap interval, by subject, context modality and grade,
    and how many answers named no option (counted wrong)."""
    [result], _ = compute_metrics(
        ["scienceqa_accuracy"],
        [
            {"prediction": r["choice"], "answer": r["answer"], "choices": r["choices"], "meta": r["meta"]}
            for r in records
        ],
    )
    return {
        "accuracy": result.value,
        "ci95": list(bootstrap_ci(result.per_sample, 0.95, 1000, seed)),
        "breakdown": result.breakdown,
        "problems": len(records),
        "unparseable": sum(r["choice"] == -1 for r in records),
    }


def score_rationales(problems: Sequence[Problem], rationales: Sequence[str], seed: int = 0) -> dict:
    """ROUGE-L (percent) of each problem's rationale against its lecture and solution; problems with
    neither are left out and counted."""
    scored = [
        {"prediction": text, "references": [gold_rationale(p)]}
        for p, text in zip(problems, rationales, strict=True)
        if gold_rationale(p)
    ]
    out = {"problems": len(scored), "without_reference": len(problems) - len(scored), "rouge_l": None}
    if scored:
        [result], _ = compute_metrics(["rouge_l"], scored)
        out.update(rouge_l=result.value, ci95=list(bootstrap_ci(result.per_sample, 0.95, 1000, seed)))
    return out


def write_results(out: Path, results: dict) -> str:
    """`results.json` and a short Markdown report (returned) in `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# ScienceQA multimodal chain-of-thought: {results['stage']}", ""]
    checkpoint = results["checkpoint"]
    lines += [
        (
            f"Checkpoint: `{checkpoint['path']}`, step {checkpoint['step']}, weights sha256 "
            f"`{checkpoint['sha256'][:16]}`; split {results['split']}"
        ),
        "",
    ]
    if "answers" in results:
        answers = results["answers"]
        low, high = answers["ci95"]
        headline = (
            f"Accuracy {answers['accuracy']:.2f} (95% CI {low:.2f}-{high:.2f}) on {answers['problems']} "
            f"problems; {answers['unparseable']} answers named no option (counted wrong)."
        )
        lines += [
            headline,
            "",
            "| " + " | ".join(answers["breakdown"]) + " |",
            "|" + " ---: |" * len(answers["breakdown"]),
            "| " + " | ".join(f"{v:.2f}" for v in answers["breakdown"].values()) + " |",
            "",
        ]
    if "rationales" in results and results["rationales"]["rouge_l"] is not None:
        rationales = results["rationales"]
        lines.append(
            f"Rationale ROUGE-L {rationales['rouge_l']:.2f} (95% CI {rationales['ci95'][0]:.2f}-"
            f"{rationales['ci95'][1]:.2f}) on {rationales['problems']} problems."
        )
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    return report
