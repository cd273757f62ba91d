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

from kosmos.bench.common import (
    add_common_arguments,
    alternate,
    cell,
    load_bench_config,
    machine,
    measure_peak_flops,
    memory_gb,
    print_report,
    synthetic_batch,
    transformers_inputs,
    transformers_twin,
)


def register(benches: argparse._SubParsersAction) -> None:
    train = benches.add_parser("train", help="training steps (DeepSpeed engine, synthetic batches)")
    add_common_arguments(train, steps=10, warmup=3)
    train.add_argument("--images-per-row", type=int, default=1, help="images in each row (default 1)")
    train.add_argument(
        "--memory",
        action="store_true",
        help="CUDA: per ZeRO stage, the largest micro-batch that fits with and without activation "
        "checkpointing, and the fewest checkpointed layers the configured micro-batch needs",
    )
    train.add_argument("--max-micro-batch", type=int, default=64, help="--memory searches up to this")
    train.add_argument(
        "--profile",
        metavar="TRACE",
        help="record the timed steps with torch.profiler: a Chrome trace to TRACE, the top operators on stderr",
    )
    train.set_defaults(handler=bench_train)


def bench_train(args: argparse.Namespace) -> int:
    cfg = load_bench_config(args.config, args.overrides)
    if args.memory:
        return memory_sweep(args, cfg)
    if args.hf and args.images_per_row < 1:
        print(
            "kosmos bench train: --hf needs --images-per-row of 1 or more (Kosmos-2 wants images)",
            file=sys.stderr,
        )
        return 2
    import warnings

    import torch

    from kosmos.model import KosmosModel, language_flops_per_token, vision_flops_per_image
    from kosmos.train.engine import build_engine, init_distributed, use_bf16
    from kosmos.train.metrics import flops_utilisation, peak_flops

    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    env = init_distributed()
    device, bf16 = env.device, use_bf16(cfg.deepspeed.bf16)
    rows, seq_len = cfg.data.micro_batch_size, cfg.data.seq_len
    batch = synthetic_batch(cfg.model, rows, seq_len, args.images_per_row)
    batch = {k: v.to(device) for k, v in batch.items()}

    torch.manual_seed(cfg.train.seed)
    model = KosmosModel(cfg.model)
    model.gradient_checkpointing = cfg.deepspeed.activation_checkpointing
    twin = transformers_twin(model) if args.hf else None  # built before any update: equal weights
    if cfg.train.compile:
        model.compile_layers()
    runs = {"ours": TrainSteps(build_engine(cfg, model, 1, bf16), batch, args.warmup)}
    memory = {"ours": memory_gb(device)}  # before the twin trains: ours alone
    if twin is not None:
        if cfg.deepspeed.activation_checkpointing:  # all of its layers: it has no partial setting
            twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        runs["theirs"] = TrainSteps(build_engine(cfg, twin, 1, bf16), transformers_inputs(batch), args.warmup)
        # On a GPU, its peak less what ours holds; on CPU the process's peak (`ru_maxrss`) only grows.
        memory["theirs"] = round(memory_gb(device) - resident / 2**30, 3) if device.type == "cuda" else None
    with _profiler(args.profile, device):
        seconds = alternate(runs, args.steps, device)
    torch.distributed.destroy_process_group()
    if not env.is_main:
        return 0

    dtype = torch.bfloat16 if bf16 else torch.float32
    measured_peak = env.world_size * measure_peak_flops(device, dtype)
    logged_peak = peak_flops(cfg.logging, device, bf16)
    report = {
        "benchmark": "train",
        "config": str(args.config),
        "machine": machine(device),
        "layers": cfg.model.text.layers,
        "width": cfg.model.text.width,
        "world_size": env.world_size,
        "micro_batch": rows,
        "seq_len": seq_len,
        "images_per_row": args.images_per_row,
        "zero_stage": cfg.deepspeed.zero_stage,
        "bf16": bf16,
        "activation_checkpointing": cfg.deepspeed.activation_checkpointing,
        "compile": cfg.train.compile,
        "attention": model.attention_backend(device, dtype, needs_grad=True),
        "steps": args.steps,
        "peak_tflops_measured": round(measured_peak / env.world_size / 1e12, 4),
        "peak_tflops_training_logs": logged_peak and logged_peak / 1e12,
    }
    # Every rank runs the same steps on batches of the same shape: rates count all of them.
    positions = env.world_size * rows * seq_len
    images = env.world_size * rows * args.images_per_row
    language, vision = language_flops_per_token(cfg.model, seq_len), vision_flops_per_image(cfg.model)
    for side, times in seconds.items():
        step_s = statistics.median(times)
        mfu = flops_utilisation(positions, images, step_s, language, vision, measured_peak)
        report[side] = {
            "step_s": round(step_s, 4),
            "step_s_mean": round(statistics.fmean(times), 4),
            "tokens_per_s": round(positions / step_s, 1),
            "samples_per_s": round(env.world_size * rows / step_s, 3),
            "images_per_s": round(images / step_s, 3),
            "peak_memory_gb": memory[side],
            "mfu_language": round(mfu["language"], 4),
            "mfu_vision": round(mfu["vision"], 4),
            "first_loss": round(runs[side].first_loss, 5),
        }
        if logged_peak:
            logged = flops_utilisation(
                positions, images, step_s, language, vision, env.world_size * logged_peak
            )
            report[side]["mfu_training_logs"] = round(logged["language"] + logged["vision"], 4)
    if twin is not None:
        report["speedup"] = round(report["theirs"]["step_s"] / report["ours"]["step_s"], 3)
    columns = ["step_s", "tokens_per_s", "samples_per_s", "peak_memory_gb", "mfu_language", "mfu_vision"]
    print_report(report, args.json, [*columns, "first_loss"])
    return 0


class TrainSteps:
    """Optimizer steps of one DeepSpeed engine on one batch; `warmup` of them run at once."""

    def __init__(self, engine, batch: dict, warmup: int):
        self.engine, self.batch = engine, batch
        self.first_loss = float(self())
        for _ in range(warmup - 1):
            self()

    def __call__(self):
        loss = self.engine(**self.batch).loss
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
