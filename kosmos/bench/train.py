"""`kosmos bench train`: optimizer steps of the DeepSpeed engine the trainer builds, ours and
optionally transformers' Kosmos-2 alternated; `--memory` searches what fits per ZeRO stage."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from kosmos.bench.common import (
    add_common_arguments,
    alternate,
    cell,
    load_bench_config,
    machine,
    measure_peak_flops,
    memory_gb,
    packed_rows,
    print_report,
    synthetic_batch,
    synthetic_packed_batch,
    transformers_inputs,
    transformers_twin,
)
from kosmos.cli import positive_int
from kosmos.config import ConfigError
from kosmos.threads import configure_threads


def register(benches: argparse._SubParsersAction) -> None:
    train = benches.add_parser("train", help="training steps (DeepSpeed engine; synthetic rows or --packed real ones)")
    add_common_arguments(train, steps=10, warmup=3)
    train.add_argument("--images-per-row", type=positive_int, default=1, help="images in each row (default 1)")
    train.add_argument(
        "--memory",
        action="store_true",
        help="CUDA: per ZeRO stage, the largest micro-batch that fits with and without activation "
        "checkpointing, and the fewest checkpointed layers the configured micro-batch needs",
    )
    train.add_argument("--max-micro-batch", type=positive_int, default=64, help="--memory searches up to this")
    train.add_argument(
        "--packed",
        metavar="CORPUS",
        help="rows packed by the data loader from the config's corpus CORPUS (its real documents, "
        "several per row) instead of synthetic rows of one document",
    )
    train.add_argument(
        "--synthetic-packed",
        action="store_true",
        help="rows packed with synthetic documents of random lengths, half with an image, and padding",
    )
    train.add_argument(
        "--attention",
        metavar="BACKENDS",
        help="compare these model.attention backends (comma-separated, the first the reference, e.g. "
        "sdpa,documents): one engine each from the same weights, alternated",
    )
    train.add_argument(
        "--profile",
        metavar="TRACE",
        help="record the timed steps with torch.profiler: a Chrome trace to TRACE, the top operators on stderr",
    )
    train.set_defaults(handler=bench_train)


def bench_train(args: argparse.Namespace) -> int:
    cfg = load_bench_config(args.config, args.overrides)
    configure_threads(setting=cfg.train.threads)
    if args.memory:
        return memory_sweep(args, cfg)
    if args.hf and (args.images_per_row < 1 or args.packed or args.synthetic_packed):
        print(
            "kosmos bench train: --hf needs synthetic rows with --images-per-row of 1 or more (Kosmos-2 "
            "wants images, one document per row; `kosmos bench time-to-loss` compares packed with padded)",
            file=sys.stderr,
        )
        return 2
    bench = set_up(args, cfg)
    seconds = measure(bench, args)
    if not bench.env.is_main:
        return 0
    columns = ["step_s", "tokens_per_s", "attention_s", "attention_share", "attention_forward_s"]
    columns.append("mfu_language")
    if len(bench.sides) > 1 and not bench.with_twin:
        columns += ["step_speedup", "attention_speedup", "forward_speedup"]
    report = train_report(bench, seconds, args)
    print_report(report, args.json, [*columns, "first_loss"], sides=[*bench.sides, "theirs"])
    return 0


@dataclass
class TrainBench:
    """What `kosmos bench train` times, built before any of it runs."""

    cfg: Any
    env: Any  # kosmos.train.engine.DistributedEnv
    bf16: bool
    batch: Any  # kosmos.data.batch.Batch
    sides: list[str]  # "ours", or each --attention backend, in the order given
    runs: dict[str, TrainSteps]  # whole optimizer steps: each side that trains, and "theirs"
    # "SIDE forward" for every side, "SIDE attention" for each that trains.
    attention: dict[str, AttentionSteps]
    resolved: dict[str, str]  # the attention backend each training side runs
    memory: dict[str, float | None]  # peak memory after building each run's engine

    @property
    def with_twin(self) -> bool:
        return "theirs" in self.runs


def set_up(args: argparse.Namespace, cfg) -> TrainBench:
    """The batch, one model per side from the same weights (and transformers' twin with --hf), and
    their DeepSpeed engines and attention steps, warmed up."""
    import dataclasses
    import warnings

    import torch

    from kosmos.model import KosmosModel
    from kosmos.model.attention import CHOICES, choose_backend
    from kosmos.train.engine import build_engine, init_distributed, use_bf16
    from kosmos.train.state import use_deterministic_algorithms

    backends = args.attention.split(",") if args.attention else [cfg.model.attention]
    unknown = [name for name in backends if name not in CHOICES]
    if unknown:
        raise ConfigError(f"--attention: unknown backend {unknown[0]!r}; choose from {', '.join(CHOICES)}")
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    if cfg.train.deterministic:
        use_deterministic_algorithms()  # before any CUDA work, as the trainer does
    env = init_distributed()
    device, bf16 = env.device, use_bf16(cfg.deepspeed.bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    rows, seq_len = cfg.data.micro_batch_size, cfg.data.seq_len
    if args.packed:
        batch = packed_rows(cfg, args.packed)
    elif args.synthetic_packed:
        batch = synthetic_packed_batch(cfg.model, rows, seq_len)
    else:
        batch = synthetic_batch(cfg.model, rows, seq_len, args.images_per_row)
    batch = batch.to(device)

    torch.manual_seed(cfg.train.seed)
    model = KosmosModel(dataclasses.replace(cfg.model, attention=backends[0]))
    twin = transformers_twin(model) if args.hf else None  # built before any update: equal weights
    models = {(backends[0] if args.attention else "ours"): model}
    for backend in backends[1:]:  # all built before any update: equal weights
        models[backend] = KosmosModel(dataclasses.replace(cfg.model, attention=backend))
        models[backend].load_state_dict(model.state_dict())
    bench = TrainBench(cfg, env, bf16, batch, list(models), {}, {}, {}, {})
    segments = batch.segment_ids
    for side, ours in models.items():
        # The attention alone, forward only (as evaluation runs it: no dropout), and forward and backward.
        forward = choose_backend(ours.cfg.attention, device, dtype, needs_grad=False, dropout=False)
        bench.attention[f"{side} forward"] = AttentionSteps(
            cfg.model, forward, segments, dtype, args.warmup, backward=False
        )
        if args.attention and not _trains(ours, device, dtype):
            continue  # a backend with a forward pass only here (FlexAttention on CPU)
        ours.gradient_checkpointing = cfg.deepspeed.activation_checkpointing
        bench.resolved[side] = ours.attention_backend(device, dtype, needs_grad=True)
        if cfg.train.compile:
            ours.compile_layers()
        bench.runs[side] = TrainSteps(build_engine(cfg, ours, 1, bf16), batch.inputs(), args.warmup)
        bench.memory[side] = memory_gb(device)  # before the twin trains: ours alone
        bench.attention[f"{side} attention"] = AttentionSteps(
            cfg.model, bench.resolved[side], segments, dtype, args.warmup
        )
    if twin is not None:
        if cfg.deepspeed.activation_checkpointing:  # all of its layers: it has no partial setting
            twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        engine = build_engine(cfg, twin, 1, bf16)
        bench.runs["theirs"] = TrainSteps(engine, transformers_inputs(batch), args.warmup)
        # On a GPU, its peak less what ours holds; on CPU the process's peak (`ru_maxrss`) only grows.
        on_gpu = device.type == "cuda"
        bench.memory["theirs"] = round(memory_gb(device) - resident / 2**30, 3) if on_gpu else None
    return bench


def measure(bench: TrainBench, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of each timed part, `args.steps` times, the parts alternated (under the profiler with
    --profile); the process group is left afterwards."""
    import torch

    with _profiler(args.profile, bench.env.device):
        seconds = alternate({**bench.runs, **bench.attention}, args.steps, bench.env.device)
    torch.distributed.destroy_process_group()
    return seconds


def train_report(bench: TrainBench, seconds: dict[str, list[float]], args: argparse.Namespace) -> dict:
    """The report: the setting, then per side its step time, rates, memory, MFU and attention share,
    and the speedups against the first side (or of ours against transformers')."""
    import torch

    from kosmos.train.metrics import peak_flops

    env, device = bench.env, bench.env.device
    dtype = torch.bfloat16 if bench.bf16 else torch.float32
    measured_peak = env.world_size * measure_peak_flops(device, dtype)
    # MFU against the peak the training logs use (a known GPU's spec or `logging.peak_tflops`),
    # else (a CPU) the measured one; the measured one beside it in any case.
    logged_peak = peak_flops(bench.cfg.logging, device, bench.bf16)
    peak = env.world_size * logged_peak if logged_peak else measured_peak
    report = {
        **_setting(bench, args),
        "mfu_peak": "spec (the training logs')" if logged_peak else "measured",
        "peak_tflops": round(peak / env.world_size / 1e12, 4),
        "peak_tflops_measured": round(measured_peak / env.world_size / 1e12, 4),
        **_sides(bench, seconds, peak, measured_peak),
    }
    _add_speedups(report, bench)
    return report


def _setting(bench: TrainBench, args: argparse.Namespace) -> dict:
    """What was measured: the machine, the model, the batch and the training settings."""
    cfg, batch = bench.cfg, bench.batch
    rows, segments = cfg.data.micro_batch_size, batch.segment_ids
    return {
        "benchmark": "train",
        "config": str(args.config),
        "machine": machine(bench.env.device),
        "layers": cfg.model.text.layers,
        "width": cfg.model.text.width,
        "world_size": bench.env.world_size,
        "micro_batch": rows,
        "seq_len": cfg.data.seq_len,
        "rows": _rows(args),
        "documents_per_row": round(_documents(segments) / rows, 2),
        "padding": round(float((segments == 0).float().mean()), 4),
        "images": len(batch.images),
        "zero_stage": cfg.deepspeed.zero_stage,
        "bf16": bench.bf16,
        "activation_checkpointing": cfg.deepspeed.activation_checkpointing,
        "compile": cfg.train.compile,
        "attention": bench.resolved.get("ours", cfg.model.attention),
        "steps": args.steps,
    }


def _sides(bench: TrainBench, seconds: dict[str, list[float]], peak: float, measured_peak: float) -> dict:
    """Per side: the attention backend and the timings, and for each side that trains its step time,
    rates, memory, MFU (against `peak` and `measured_peak`) and its attention's share of the step."""
    from kosmos.model import attention_pairs, training_flops
    from kosmos.model.attention import attends_per_document
    from kosmos.tokenizer import IGNORE_INDEX
    from kosmos.train.metrics import flops_utilisation

    cfg, world, batch = bench.cfg, bench.env.world_size, bench.batch
    # Every rank runs the same steps on batches of the same shape: rates count all of them.
    rows = world * cfg.data.micro_batch_size
    positions = rows * cfg.data.seq_len
    images = world * len(batch.images)
    labelled = world * int((batch.labels != IGNORE_INDEX).sum())

    def flops(side: str) -> dict[str, float]:
        """The FLOPs of one step as the training logs count them, for the attention `side` runs."""
        per_document = side in bench.resolved and attends_per_document(bench.resolved[side])
        pairs = world * float(attention_pairs(batch.segment_ids, per_document).sum())
        return training_flops(cfg.model, positions, labelled, images, pairs)

    sides = {
        side: {
            "backend": bench.resolved.get(side, "forward only"),
            "attention_forward_s": round(statistics.median(seconds[f"{side} forward"]), 4),
        }
        for side in bench.sides
    }
    for side, run in bench.runs.items():
        times = seconds[side]
        step_s = statistics.median(times)
        mfu = flops_utilisation(flops(side), step_s, peak)
        measured = flops_utilisation(flops(side), step_s, measured_peak)
        sides.setdefault(side, {}).update(
            {
                "step_s": round(step_s, 4),
                "step_s_mean": round(statistics.fmean(times), 4),
                "tokens_per_s": round(positions / step_s, 1),
                "samples_per_s": round(rows / step_s, 3),
                "images_per_s": round(images / step_s, 3),
                "peak_memory_gb": bench.memory[side],
                "mfu_language": round(mfu["language"], 4),
                "mfu_vision": round(mfu["vision"], 4),
                "mfu_measured_peak": round(measured["language"] + measured["vision"], 4),
                "first_loss": round(run.first_loss, 5),
            }
        )
        if side in bench.resolved:
            attention_s = statistics.median(seconds[f"{side} attention"])
            sides[side]["attention_s"] = round(attention_s, 4)
            sides[side]["attention_share"] = round(attention_s / step_s, 3)
    return sides


def _add_speedups(report: dict, bench: TrainBench) -> None:
    """Ours against transformers' twin; or each backend against the first listed: the whole step, its
    attention, the attention's forward."""
    if bench.with_twin:
        report["speedup"] = round(report["theirs"]["step_s"] / report["ours"]["step_s"], 3)
        return
    reference, *others = bench.sides
    first = report[reference]
    for side in others:
        this = report[side]
        if side in bench.runs and reference in bench.runs:
            this["step_speedup"] = round(first["step_s"] / this["step_s"], 3)
            this["attention_speedup"] = round(first["attention_s"] / this["attention_s"], 3)
        this["forward_speedup"] = round(first["attention_forward_s"] / this["attention_forward_s"], 3)


def _rows(args: argparse.Namespace) -> str:
    if args.packed:
        return f"packed from {args.packed}"
    return "synthetic, packed" if args.synthetic_packed else "synthetic, one document each"


def _documents(segments) -> int:
    from kosmos.model.attention import document_runs

    _, _, ids = document_runs(segments)
    return int((ids != 0).sum())


def _trains(model, device, dtype) -> bool:
    try:
        model.attention_backend(device, dtype, needs_grad=True)
    except ConfigError:
        return False
    return True


class AttentionSteps:
    """The attention of one step alone: the backend prepared for the batch's segments, then once per
    decoder layer its forward and (`backward`) backward, on random q, k, v of the model's shapes."""

    def __init__(self, model_cfg, backend: str, segments, dtype, warmup: int, backward: bool = True):
        import torch

        text = model_cfg.text
        batch, length = segments.shape
        shape = (batch, text.heads, length, text.width // text.heads)
        self.q, self.k, self.v = (
            torch.randn(shape, device=segments.device, dtype=dtype).requires_grad_(backward) for _ in range(3)
        )
        self.grad = torch.randn(shape, device=segments.device, dtype=dtype)
        self.backend, self.segments, self.layers = backend, segments, text.layers
        self.backward = backward
        self.dropout = text.attention_dropout if backward else 0.0
        for _ in range(warmup):
            self()

    def __call__(self) -> None:
        import torch

        from kosmos.model.attention import prepare_attention

        with torch.set_grad_enabled(self.backward):
            attend = prepare_attention(self.backend, self.segments)
            for _ in range(self.layers):
                out = attend(self.q, self.k, self.v, self.dropout)
                if self.backward:
                    out.backward(self.grad)


class TrainSteps:
    """Optimizer steps of one DeepSpeed engine on one batch; `warmup` of them run at once."""

    def __init__(self, engine, inputs: dict, warmup: int):
        self.engine, self.inputs = engine, inputs
        self.first_loss = float(self())
        for _ in range(warmup - 1):
            self()

    def __call__(self):
        loss = self.engine(**self.inputs).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()


@contextlib.contextmanager
def _profiler(trace: str | None, device):
    if trace is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as recorded:
        yield
    recorded.export_chrome_trace(trace)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(recorded.key_averages().table(sort_by=sort, row_limit=20), file=sys.stderr)


def memory_sweep(args: argparse.Namespace, cfg) -> int:
    """Per ZeRO stage: the largest micro-batch without activation checkpointing and with all layers
    checkpointed, and the fewest checkpointed layers that fit the configured micro-batch.

    Each try runs `kosmos bench train` in a process of its own, so that running out of memory leaves
    nothing behind for the next one. In one process the stages differ only in their own overheads:
    ZeRO divides the model's states among ranks, and here there is one.
    """
    import torch

    if not torch.cuda.is_available():
        print(
            "kosmos bench train --memory: skipped, it needs a CUDA GPU (on CPU there is no device memory "
            "to fill; host memory is shared by everything on the machine)"
        )
        return 0

    def attempt(stage: int, micro_batch: int, checkpointed: int) -> dict | None:
        """The `ours` report of one try, or None when it ran out of memory."""
        command = [
            *(sys.executable, "-m", "kosmos", "bench", "train", "--config", str(args.config), "--json"),
            *("--steps", "2", "--warmup", "1", "--images-per-row", str(args.images_per_row)),
            *args.overrides,
            f"deepspeed.zero_stage={stage}",
            f"data.micro_batch_size={micro_batch}",
            f"deepspeed.activation_checkpointing={checkpointed}",
        ]
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode == 0:
            return json.loads(run.stdout.strip().splitlines()[-1])["ours"]
        if "out of memory" in run.stderr.lower():
            return None
        raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")

    layers, micro_batch = cfg.model.text.layers, cfg.data.micro_batch_size
    results = []
    for stage in (1, 2, 3):
        for checkpointed in (0, layers):
            tries = functools.partial(attempt, stage, checkpointed=checkpointed)
            size, found = largest_that_fits(tries, args.max_micro_batch)
            results.append(_memory_row(stage, size, checkpointed, found))
        checkpointed, found = fewest_that_fit(functools.partial(attempt, stage, micro_batch), layers)
        results.append(_memory_row(stage, micro_batch if found else 0, checkpointed, found))

    device = torch.device("cuda")
    report = {
        "benchmark": "train --memory",
        "config": str(args.config),
        "machine": machine(device),
        "seq_len": cfg.data.seq_len,
        "layers": layers,
        "results": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['machine']}, {args.config}, seq_len {cfg.data.seq_len}, {layers} layers")
    print(
        f"{'stage':>5} {'micro-batch':>11} {'ckpt layers':>11} {'peak GB':>8} {'tokens/s':>10} {'MFU lang':>8}"
    )
    for r in results:
        print(
            f"{r['zero_stage']:>5} {r['micro_batch']:>11} {r['checkpointed_layers']!s:>11} "
            f"{cell(r['peak_memory_gb']):>8} {cell(r['tokens_per_s']):>10} {cell(r['mfu_language']):>8}"
        )
    return 0


def largest_that_fits(fits, cap: int) -> tuple[int, dict | None]:
    """Doubling from 1, then bisection; 0 when even 1 does not fit."""
    good, found, size = 0, None, 1
    while size <= cap and (result := fits(size)) is not None:
        good, found, size = size, result, size * 2
    bad = size
    while good and bad <= cap and bad - good > 1:
        middle = (good + bad) // 2
        if (result := fits(middle)) is not None:
            good, found = middle, result
        else:
            bad = middle
    return good, found


def fewest_that_fit(fits, most: int) -> tuple[int | None, dict | None]:
    """Bisection over 0..most checkpointed layers (more layers, less memory); None when none fits."""
    low, high, found = 0, most, fits(most)
    if found is None:
        return None, None
    while low < high:
        middle = (low + high) // 2
        if (result := fits(middle)) is not None:
            high, found = middle, result
        else:
            low = middle + 1
    return high, found


def _memory_row(stage: int, micro_batch: int, checkpointed: int | None, found: dict | None) -> dict:
    found = found or {}
    return {
        "zero_stage": stage,
        "micro_batch": micro_batch,
        "checkpointed_layers": checkpointed,
        "peak_memory_gb": found.get("peak_memory_gb"),
        "tokens_per_s": found.get("tokens_per_s"),
        "mfu_language": found.get("mfu_language"),
    }
