"""`kosmos bench time-to-loss`: wall time until training reaches a loss, ours against transformers'
Kosmos-2, on the same documents from the same initial weights.

Ours trains on the loader's packed rows. transformers' Kosmos-2 trains on the same documents (each
packed piece of a row becomes a row of its own), in padded micro-batches of at most the same number
of positions as ours (`micro_batch_size x seq_len`), in the same order. Both sides take one optimizer
step per step of data, with the same loss (the mean over every labelled token of the step), the same
AdamW, learning-rate schedule and gradient clipping: the trainer's, in a plain PyTorch loop on both
sides (no DeepSpeed, whose fixed gradient accumulation does not fit a varying number of padded
micro-batches). Steps alternate between the sides so that both see the same machine load; the data
is loaded before any timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import TYPE_CHECKING

from kosmos.bench.common import machine, synchronize, transformers_twin
from kosmos.cli import positive_int
from kosmos.config import ConfigError
from kosmos.threads import configure_threads

if TYPE_CHECKING:
    from kosmos.data.batch import Batch


def register(benches: argparse._SubParsersAction) -> None:
    bench = benches.add_parser(
        "time-to-loss", help="wall time to reach a training loss: packed (ours) against padded (transformers)"
    )
    bench.add_argument("--config", required=True, help="training YAML (model, tokenizer, corpora, optimizer)")
    bench.add_argument(
        "--steps", type=positive_int, default=150, help="optimizer steps each side trains (default 150)"
    )
    bench.add_argument(
        "--target",
        type=float,
        help="the training loss to reach (default: the higher of the two sides' last smoothed losses)",
    )
    bench.add_argument(
        "--smooth", type=positive_int, default=10, help="steps in the moving average of the loss (default 10)"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides")
    bench.set_defaults(handler=bench_time_to_loss)


def bench_time_to_loss(args: argparse.Namespace) -> int:
    import torch

    from kosmos.data import build_loader
    from kosmos.model import KosmosModel
    from kosmos.tokenizer import Tokenizer
    from kosmos.train.config import check_inputs, load_train_config

    if args.steps < 1 or args.smooth < 1:
        raise ConfigError("--steps and --smooth: must be at least 1")
    cfg = load_train_config(args.config, args.overrides)
    check_inputs(cfg)
    # The loader's workers have produced every step before the first is timed.
    configure_threads(setting=cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    queries = cfg.model.connector.num_queries
    loader = build_loader(cfg.data, Tokenizer(cfg.tokenizer), cfg.model.vision.image_size, queries)
    budget = cfg.data.micro_batch_size * cfg.data.seq_len
    steps = []
    for _, micro_batches in zip(range(args.steps), loader):
        ours = [mb.to(device).inputs() for mb in micro_batches]
        documents = [doc for mb in micro_batches for doc in split_documents(mb, queries)]
        theirs = [to_device(b, device) for b in padded_batches(documents, budget)]
        steps.append((ours, theirs))

    torch.manual_seed(cfg.train.seed)
    model = KosmosModel(cfg.model).to(device).train()
    twin = transformers_twin(model).to(device).train()  # built before any update: equal weights
    sides = {
        "ours": RecordedSteps(model, cfg, args.steps, ours_micro_step),
        "theirs": RecordedSteps(twin, cfg, args.steps, theirs_micro_step),
    }
    for index, (ours, theirs) in enumerate(steps):
        for name, micro_batches in (("ours", ours), ("theirs", theirs)):
            sides[name].step(micro_batches, device)
        if not args.json and index % 10 == 0:
            losses = ", ".join(f"{name} {side.losses[-1]:.4f}" for name, side in sides.items())
            print(f"step {index}: {losses}", file=sys.stderr)

    smoothed = {name: moving_average(side.losses, args.smooth) for name, side in sides.items()}
    gap = max(abs(a - b) for a, b in zip(sides["ours"].losses, sides["theirs"].losses))
    target = args.target if args.target is not None else max(s[-1] for s in smoothed.values())
    report = {
        "benchmark": "time-to-loss",
        "config": str(args.config),
        "machine": machine(device),
        "steps": len(steps),
        "seq_len": cfg.data.seq_len,
        "micro_batch_positions": budget,
        "smooth": args.smooth,
        "target_loss": round(target, 4),
        "max_loss_gap": float(f"{gap:.2e}"),
    }
    for name, side in sides.items():
        reached = next((i for i, loss in enumerate(smoothed[name]) if loss <= target), None)
        elapsed = [sum(side.seconds[: i + 1]) for i in range(len(side.seconds))]
        report[name] = {
            "first_loss": round(side.losses[0], 5),
            "last_loss": round(smoothed[name][-1], 4),
            "step_s": round(statistics.median(side.seconds), 4),
            "micro_batches_per_step": round(statistics.fmean(side.micro_batches), 2),
            "positions_per_step": round(statistics.fmean(side.positions), 1),
            "labelled_per_step": round(statistics.fmean(side.labelled), 1),
            "steps_to_target": None if reached is None else reached + 1,
            "seconds_to_target": None if reached is None else round(elapsed[reached], 2),
            "total_s": round(elapsed[-1], 2),
        }
    ours_s, theirs_s = report["ours"]["seconds_to_target"], report["theirs"]["seconds_to_target"]
    report["speedup"] = round(theirs_s / ours_s, 3) if ours_s and theirs_s else None
    if args.json:
        print(json.dumps(report))
        return 0
    for key, value in report.items():
        if key not in ("ours", "theirs", "speedup"):
            print(f"{key}: {value}")
    columns = list(report["ours"])
    print(f"{'':>7} " + " ".join(f"{c:>22}" for c in columns))
    for name in ("ours", "theirs"):
        print(f"{name:>7} " + " ".join(f"{report[name][c]!s:>22}" for c in columns))
    print(f"time to loss {report['target_loss']}, theirs / ours: {report['speedup']}x")
    return 0


def split_documents(batch: Batch, num_queries: int) -> list[dict]:
    """The packed pieces of a micro-batch, one dict each (ids, image_mask, labels, images), in row
    order: what a trainer without packing feeds one row each."""
    from kosmos.model.attention import document_runs

    starts, lengths, ids = (t.tolist() for t in document_runs(batch.segment_ids))
    flat = {key: getattr(batch, key).flatten() for key in ("input_ids", "image_mask", "labels")}
    documents, image = [], 0
    for start, length, segment in zip(starts, lengths, ids):
        if segment == 0:
            continue
        piece = {key: value[start : start + length] for key, value in flat.items()}
        count = int(piece["image_mask"].sum()) // num_queries
        piece["images"] = batch.images[image : image + count]
        image += count
        documents.append(piece)
    return documents


def padded_batches(documents: list[dict], budget: int) -> list[dict]:
    """Documents in order, in right-padded micro-batches of at most `budget` positions, as
    transformers' Kosmos-2 takes them (labels unshifted: it shifts them itself)."""
    groups, group = [], []
    for doc in documents:
        longest = max([len(d["input_ids"]) for d in group] + [len(doc["input_ids"])])
        if group and (len(group) + 1) * longest > budget:
            groups.append(group)
            group = []
        group.append(doc)
    if group:
        groups.append(group)
    return [_pad(group) for group in groups]


def _pad(group: list[dict]) -> dict:
    import torch

    from kosmos.tokenizer import IGNORE_INDEX, PAD

    longest = max(len(d["input_ids"]) for d in group)

    def stack(key: str, fill) -> torch.Tensor:
        rows = [d[key] for d in group]
        return torch.stack([torch.cat([r, r.new_full((longest - len(r),), fill)]) for r in rows])

    labels = stack("labels", IGNORE_INDEX)
    inputs = {
        "input_ids": stack("input_ids", PAD),
        "image_embeds_position_mask": stack("image_mask", False).long(),
        "labels": torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], 1),
    }
    inputs["attention_mask"] = torch.stack(
        [(torch.arange(longest) < len(d["input_ids"])).long() for d in group]
    )
    images = torch.cat([d["images"] for d in group])
    if len(images):
        inputs["pixel_values"] = images
    return inputs


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class RecordedSteps:
    """One side's optimizer steps: the trainer's AdamW, schedule and clipping, a loss normalised by
    the labelled tokens of the whole step; records each step's loss, seconds and sizes."""

    def __init__(self, model, cfg, total_steps: int, micro_step):
        from kosmos.train.optim import build_lr_schedule, build_optimizer

        self.model, self.micro_step = model, micro_step
        self.optimizer = build_optimizer(model, cfg.optimizer, offload=False)
        self.schedule = build_lr_schedule(self.optimizer, cfg.optimizer, total_steps)
        self.clip = cfg.optimizer.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.losses, self.seconds, self.positions, self.labelled, self.micro_batches = [], [], [], [], []

    def step(self, micro_batches: list[dict], device) -> None:
        import torch

        labelled = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)  # before the clock
        synchronize(device)
        start = time.perf_counter()
        total = 0.0
        for mb in micro_batches:
            loss_sum = self.micro_step(self.model, mb)
            if loss_sum is not None:
                (loss_sum / labelled).backward()
                total += loss_sum.detach()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(total) / labelled
        synchronize(device)
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(loss)
        self.positions.append(sum(mb["input_ids"].numel() for mb in micro_batches))
        self.labelled.append(labelled)
        self.micro_batches.append(len(micro_batches))


def ours_micro_step(model, batch: dict):
    return model(**batch).token_loss.sum()


def theirs_micro_step(twin, batch: dict):
    """Kosmos-2's mean loss over the micro-batch's labelled tokens, times their number (None when
    there are none: its mean would be 0 / 0)."""
    count = int((batch["labels"] != -100).sum())
    if not count:
        return None
    if "pixel_values" in batch:
        return twin(**batch).loss * count
    text = {k: v for k, v in batch.items() if k != "image_embeds_position_mask"}
    return twin.text_model(**text).loss * count


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]
