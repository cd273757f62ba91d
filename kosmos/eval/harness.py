"""The evaluation loop: tasks x shots x trials, sharded over ranks, cached, scored and reported.

Every task file is read, validated and its data checked before the model runs. Each run (task, shot
count, demonstration scheme, trial) keeps its predictions in `OUT/predictions/<run>/predictions.jsonl`,
appended batch by batch by rank 0, each record under the hash of everything that decides it
(`kosmos.eval.cache`): an interrupted evaluation continues where it stopped, and a rerun after a
change (further training, an edited annotation or template) runs again exactly the samples whose
inputs changed. Scoring always reads the current references. With
several processes (torchrun: RANK, WORLD_SIZE), each step gives every rank a slice of the next batch
and rank 0 gathers the records; only rank 0 writes. Scores go to `OUT/results.json`, and
`OUT/report.md` shows them in a table next to a plot of score against shots.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from kosmos.config import ConfigError, to_dict
from kosmos.distributed import join_process_group
from kosmos.eval.cache import CheckpointIdentity, ImageHashes, PredictionCache, PredictionKeys, data_files
from kosmos.eval.datasets import Sample, load_samples
from kosmos.eval.demos import SCHEMES, build_selector, check_demos
from kosmos.eval.metrics import MetricResult, baseline_scores, bootstrap_ci, compute_metrics
from kosmos.eval.report import write_report
from kosmos.eval.runners import run_batch, sample_fields
from kosmos.eval.tasks import TaskConfig, load_task, task_path

T = TypeVar("T")


@dataclass
class EvalOptions:
    tasks: list[str]
    out: Path
    shots: list[int] = field(default_factory=lambda: [0])
    demos: str = "random"
    trials: int = 1
    limit: int | None = None
    # With `limit`: the first N samples, rather than N drawn (seeded) across the answers.
    limit_first: bool = False
    batch_size: int = 8
    data_root: Path = Path(".")
    task_dir: Path | None = None
    seed: int = 0
    bootstrap_resamples: int = 1000
    confidence: float = 0.95

    def validate(self) -> None:
        if self.demos not in SCHEMES:
            raise ConfigError(f"--demos: unknown scheme {self.demos!r} (known: {', '.join(SCHEMES)})")
        if not self.shots or any(s < 0 for s in self.shots):
            raise ConfigError(f"--shots: counts must be >= 0, got {self.shots}")
        if self.trials < 1 or self.batch_size < 1:
            raise ConfigError("--trials and --batch-size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be >= 1")
        if self.limit_first and self.limit is None:
            raise ConfigError("--limit-first: only with --limit N")


@dataclass
class PreparedTask:
    path: Path
    config: TaskConfig
    samples: list[Sample]
    pool: list[Sample] | None  # demonstrations, when the task has a demo split and shots are asked for
    files: dict[str, dict]  # data files by config key: path and content hash


@dataclass
class Run:
    """One evaluation of one task at one shot count (and trial)."""

    task: PreparedTask
    shots: int
    trial: int
    demos: str | None  # None at zero shots

    @property
    def key(self) -> str:
        if self.shots == 0:
            return f"{self.task.config.name}/0shot"
        return f"{self.task.config.name}/{self.demos}/{self.shots}shot_trial{self.trial}"


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the process group torchrun describes, if there is one (`kosmos.distributed`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        join_process_group()


def log(message: str) -> None:
    if rank_and_world()[0] == 0:
        print(f"kosmos eval: {message}", file=sys.stderr, flush=True)


def prepare_tasks(options: EvalOptions) -> list[PreparedTask]:
    """Read every task and its data up front, so a bad file stops everything before compute."""
    prepared = []
    wants_demos = any(s > 0 for s in options.shots)
    for name in options.tasks:
        path = task_path(name, options.task_dir)
        task = load_task(name, options.task_dir)
        try:
            samples = load_samples(task, "eval", options.data_root)
            pool = load_samples(task, "demos", options.data_root) if wants_demos and task.few_shot else None
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        if options.limit is not None:
            samples = samples[: options.limit] if options.limit_first else spread(samples, options.limit, options.seed)
        for shots in options.shots if pool is not None else ():
            if shots:
                check_demos(options.demos, pool, samples, shots, str(path))
        prepared.append(PreparedTask(path, task, samples, pool, data_files(task, options.data_root)))
    return prepared


def spread(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """`limit` samples drawn with `seed` as evenly as they allow over the samples' answers (classes),
    in their original order: the first N of a file sorted by class would hold a few classes only."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(_answer(sample), []).append(i)
    queues = [list(rng.permutation(members)) for members in groups.values()]
    order = rng.permutation(len(queues))
    chosen: list[int] = []
    while len(chosen) < min(limit, len(samples)):
        for q in order:  # one from each answer in turn, while it has any left
            if queues[q] and len(chosen) < limit:
                chosen.append(int(queues[q].pop()))
    return [samples[i] for i in sorted(chosen)]


def _answer(sample: Sample) -> str:
    try:
        return sample.target
    except ValueError:  # nothing to group by (e.g. Raven's candidate images): one group
        return ""


def plan_runs(tasks: Sequence[PreparedTask], options: EvalOptions) -> list[Run]:
    runs = []
    for task in tasks:
        for shots in options.shots:
            if shots == 0:
                runs.append(Run(task, 0, 0, None))
            elif task.pool is None:
                log(f"{task.config.name}: no demonstration split, {shots}-shot skipped (zero-shot only)")
            else:
                # Retrieval is deterministic: only random demonstrations have trials to repeat.
                trials = options.trials if options.demos == "random" else 1
                runs.extend(Run(task, shots, t, options.demos) for t in range(trials))
    return runs


def _broadcast(value):
    if dist.is_available() and dist.is_initialized():
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def _gather(records: list[dict]) -> list[dict]:
    if dist.is_available() and dist.is_initialized():
        rank, world = rank_and_world()
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(records, gathered, dst=0)
        return [r for part in gathered for r in part] if rank == 0 else []
    return records


def cached_records(
    cache: PredictionCache,
    items: Mapping[str, T],
    keys: Callable[[], dict[str, str]],
    predict_batch: Callable[[list[T]], list[dict]],
    batch_size: int,
    label: str,
) -> dict[str, dict] | None:
    """The record of every item (by id, on rank 0; None elsewhere), predicting only the items that
    `cache` holds under no record or one of another key: the cached loop of every prediction command.

    `keys()` (run on rank 0) gives each item's current key, `predict_batch` the records (with the
    item's `id`) of a list of items. With several ranks, each predicts its slice of every batch of
    `batch_size` per rank, and rank 0 gathers the records and appends them to the cache.
    """
    rank, world = rank_and_world()
    cached: dict[str, dict] = {}
    current: dict[str, str] = {}
    if rank == 0:
        current = keys()
        cached = {i: r for i, r in cache.read().items() if i in current and r.get("key") == current[i]}
    done = _broadcast(set(cached))
    todo = [item for i, item in items.items() if i not in done]
    bar = tqdm(total=len(todo), desc=label, unit="sample", dynamic_ncols=True, disable=rank != 0 or not todo)
    if todo and rank == 0:
        bar.write(
            f"{label}: {len(todo)} of {len(items)} samples to run ({len(done)} cached)", file=sys.stderr
        )
    step_size = batch_size * world
    for start in range(0, len(todo), step_size):
        mine = todo[start : start + step_size][rank::world]
        records = _gather(predict_batch(mine) if mine else [])
        if rank == 0:
            for record in records:
                record["key"] = current[record["id"]]
            cache.append(records)
            cached.update((r["id"], r) for r in records)
            bar.update(len(records))
    bar.close()
    return cached if rank == 0 else None


def predict(
    run: Run,
    backend,
    selector,
    options: EvalOptions,
    checkpoint: CheckpointIdentity | None,
    images: ImageHashes,
) -> list[dict] | None:
    """Every sample's record for `run` (on rank 0; None elsewhere), running only what is not cached
    under its current key."""
    samples, pool = run.task.samples, run.task.pool
    cache = PredictionCache(options.out / "predictions" / run.key)
    demos = {
        s.id: [pool[i] for i in selector.select(s, run.shots, run.trial)] if run.shots else []
        for s in samples
    }

    def keys() -> dict[str, str]:
        make_key = PredictionKeys(run.task.config, checkpoint, images)
        return {s.id: make_key(s, demos[s.id]) for s in samples}

    def predict_batch(batch: list[Sample]) -> list[dict]:
        records = run_batch(run.task.config, backend, batch, [demos[s.id] for s in batch])
        for record in records:
            record.update(shots=run.shots, trial=run.trial, demos=[d.id for d in demos[record["id"]]])
        return records

    label = f"kosmos eval: {run.key}"
    cached = cached_records(cache, {s.id: s for s in samples}, keys, predict_batch, options.batch_size, label)
    if cached is None:
        return None
    # What the metrics compare with comes from the data as it is now, not as it was when predicted.
    records = [{**cached[s.id], **sample_fields(s)} for s in samples]
    cache.rewrite(records)
    return records


def score(run: Run, records: list[dict], options: EvalOptions) -> list[dict]:
    """Result rows for one run: one per metric, with a bootstrap interval where the metric allows."""
    task = run.task.config
    results, unavailable = compute_metrics(task.metrics, records)
    base = {
        "task": task.name,
        "shots": run.shots,
        "trial": run.trial,
        "demos": run.demos,
        "num_samples": len(records),
        "config": to_dict(task),
    }
    baselines = baseline_scores(records)
    if baselines:
        base["baselines"] = baselines
    rows = []
    for result in results:
        rows.append({**base, **_metric_fields(result, options), "per_sample": result.per_sample})
    for name, reason in unavailable.items():
        rows.append({**base, "metric": name, "value": None, "unavailable": reason})
        log(f"{task.name}: {name} not computed: {reason}")
    return rows


def _metric_fields(result: MetricResult, options: EvalOptions) -> dict:
    ci = None
    if result.per_sample:
        ci = list(
            bootstrap_ci(result.per_sample, options.confidence, options.bootstrap_resamples, options.seed)
        )
    return {
        "metric": result.metric,
        "value": result.value,
        "ci": ci,
        "confidence": options.confidence,
        "breakdown": result.breakdown,
        "note": result.note,
    }


def summarize(rows: Sequence[dict], options: EvalOptions) -> list[dict]:
    """Per task, metric and shot count: mean and spread over trials, and a bootstrap interval of the
    per-sample scores averaged over trials."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["metric"], row["shots"]), []).append(row)
    summary = []
    for (task, metric, shots), members in groups.items():
        values = [m["value"] for m in members if m["value"] is not None]
        entry = {
            "task": task,
            "metric": metric,
            "shots": shots,
            "trials": len(members),
            "demos": members[0]["demos"],
            "num_samples": members[0]["num_samples"],
            "note": members[0].get("note"),
        }
        if "baselines" in members[0]:
            entry["baselines"] = members[0]["baselines"]
        if not values:
            entry.update(value=None, std=None, ci=None, unavailable=members[0].get("unavailable"))
        else:
            per_sample = [m.get("per_sample") for m in members]
            ci = None
            if all(per_sample):
                averaged = np.mean(np.asarray(per_sample, dtype=np.float64), axis=0)
                ci = list(
                    bootstrap_ci(averaged, options.confidence, options.bootstrap_resamples, options.seed)
                )
            entry.update(
                value=statistics.fmean(values),
                std=statistics.pstdev(values) if len(values) > 1 else 0.0,
                ci=ci,
            )
        summary.append(entry)
    return summary


def write_results(
    rows: list[dict],
    options: EvalOptions,
    tasks: Sequence[PreparedTask],
    checkpoint: CheckpointIdentity | None,
    model_config: dict | None,
) -> dict:
    results = {
        "checkpoint": checkpoint.as_dict() if checkpoint is not None else None,
        "model_config": model_config,
        "data_files": {t.config.name: t.files for t in tasks},
        "options": {
            "tasks": options.tasks,
            "shots": options.shots,
            "demos": options.demos,
            "trials": options.trials,
            "limit": options.limit,
            "limit_first": options.limit_first,
            "seed": options.seed,
            "confidence": options.confidence,
        },
        "summary": summarize(rows, options),
        "results": [{k: v for k, v in r.items() if k != "per_sample"} for r in rows],
    }
    options.out.mkdir(parents=True, exist_ok=True)
    tmp = options.out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(options.out / "results.json")
    return results


def evaluate(
    backend,
    options: EvalOptions,
    checkpoint: CheckpointIdentity | None = None,
    model_config: dict | None = None,
    embedder=None,
    tasks: list[PreparedTask] | None = None,
) -> dict | None:
    """Run every task at every shot count; returns the results (on rank 0; None elsewhere).

    `backend` answers prompts (`ModelBackend` around a model, or anything with its two methods);
    `checkpoint` identifies its weights (`kosmos.eval.cache.checkpoint_identity`), part of every
    prediction's cache key;
    `embedder` gives CLIP embeddings for the retrieval demonstration schemes; `tasks` are the
    prepared tasks when the caller has read them already (before loading the model).
    """
    options.validate()
    tasks = tasks if tasks is not None else prepare_tasks(options)
    init_distributed()
    rank, _ = rank_and_world()
    runs = plan_runs(tasks, options)
    rows: list[dict] = []
    # Demonstration selectors first (retrieval embeds every pool and query): a failure there stops
    # the evaluation before any prediction runs.
    few_shot = {run.task.config.name: run.task for run in runs if run.shots}
    selectors = {
        name: build_selector(
            options.demos, task.pool, task.samples, embedder, task.config.demo_group, options.seed
        )
        for name, task in few_shot.items()
    }
    images = ImageHashes()
    for run in runs:
        selector = selectors.get(run.task.config.name)
        records = predict(run, backend, selector, options, checkpoint, images)
        if rank == 0:
            rows.extend(score(run, records, options))
            write_results(rows, options, tasks, checkpoint, model_config)
    if rank != 0:
        return None
    results = write_results(rows, options, tasks, checkpoint, model_config)
    write_report(results, options.out)
    log(f"results in {options.out / 'results.json'}, report in {options.out / 'report.md'}")
    return results
