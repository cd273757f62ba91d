"""`kosmos bench gpu`: one command that checks and measures the CUDA path, within a time budget.

1. attention: every packed-row backend that runs here against the dense-mask reference, in bf16 on
   packed rows of the configured model (two decoder layers, no dropout): logits and gradients; then
   each one's attention time (forward and backward of one layer) on packed rows of short documents,
   at the configured model's shapes and sequence length.
2. train: `kosmos bench train` of the configured model for a few steps per ZeRO stage (tokens/s, MFU,
   peak memory), each in a process of its own so that one stage's memory does not stay for the next.
3. generate: `kosmos bench generate` (greedy decoding with a KV cache, a batch of prompts).

Everything goes into one JSON file; a part that does not fit in the remaining budget is recorded as
skipped. Without a CUDA device it prints that it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time

from kosmos.bench.common import load_bench_config, synthetic_packed_batch, timed
from kosmos.cli import positive_int
from kosmos.config import ConfigError
from kosmos.threads import configure_threads

# Agreement with the reference in bf16: relative error of the logits, cosine of each gradient.
LOGITS_RELATIVE_ERROR = 2e-2
GRADIENT_COSINE = 0.99
# What a backend that cannot run raises: not installed, refused for this device, failed to compile
# (torch.compile's errors are RuntimeErrors), out of memory.
BACKEND_FAILURES = (ConfigError, ImportError, RuntimeError, ValueError)


def register(benches: argparse._SubParsersAction) -> None:
    gpu = benches.add_parser(
        "gpu", help="check and measure the CUDA path in one go (attention, training, decoding)"
    )
    gpu.add_argument("--config", default="configs/train/kosmos1.yaml", help="training or model YAML")
    gpu.add_argument("--out", default="bench_gpu.json", help="the JSON report (default bench_gpu.json)")
    gpu.add_argument("--budget", type=float, default=450, help="seconds for the whole run (default 450)")
    gpu.add_argument("--stages", default="1,2,3", help="ZeRO stages to train with (default 1,2,3)")
    gpu.add_argument("--train-steps", type=positive_int, default=4, help="timed training steps per stage (default 4)")
    gpu.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides")
    gpu.set_defaults(handler=bench_gpu)


def bench_gpu(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("kosmos bench gpu: skipped, no CUDA device here (it checks and measures the GPU path)")
        return 0
    deadline = time.monotonic() + args.budget
    cfg = load_bench_config(args.config, args.overrides)
    configure_threads(setting=cfg.train.threads)
    device = torch.device("cuda")
    report = {
        "benchmark": "gpu",
        "config": str(args.config),
        "machine": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seq_len": cfg.data.seq_len,
        "micro_batch": cfg.data.micro_batch_size,
    }
    report["attention_checks"] = check_backends(cfg.model, device, torch.bfloat16, cuda_backends())
    _save(report, args.out)
    report["attention_times"] = time_backends(cfg.model, cfg.data.seq_len, device, cuda_backends())
    _save(report, args.out)
    report["train"] = {}
    for stage in args.stages.split(","):
        command = ["train", "--steps", str(args.train_steps), "--warmup", "2"]
        stage_override = f"deepspeed.zero_stage={stage}"
        report["train"][f"zero{stage}"] = _subcommand(args, command, deadline, stage_override)
        _save(report, args.out)
    report["generate"] = _subcommand(
        args, ["generate", "--batch", "8", "--new-tokens", "64", "--steps", "3"], deadline
    )
    _save(report, args.out)
    _print_summary(report)
    print(f"written to {args.out}")
    return 0


def cuda_backends() -> list[str]:
    from kosmos.model import attention

    backends = ["documents", "flex"]
    if attention.varlen_attn is not None:
        backends.append("varlen")
    if attention.flash_attn_varlen_func is not None:
        backends.append("flash")
    return backends


def check_backends(model_cfg, device, dtype, backends: list[str]) -> dict:
    """Per backend: logits and gradients on packed rows against the dense-mask reference."""
    import torch

    from kosmos.model import KosmosModel

    text = dataclasses.replace(model_cfg.text, layers=2, dropout=0.0, attention_dropout=0.0)
    vision = dataclasses.replace(model_cfg.vision, layers=min(2, model_cfg.vision.layers), weights=None)
    vision = dataclasses.replace(vision, trainable_blocks=min(vision.trainable_blocks, vision.layers))
    cfg = dataclasses.replace(model_cfg, text=text, vision=vision, attention="sdpa")
    batch = synthetic_packed_batch(cfg, rows=2, seq_len=min(1024, text.max_positions))
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["images"] = batch["images"].to(dtype)
    real = batch["segment_ids"] > 0

    torch.manual_seed(0)
    reference = KosmosModel(cfg).to(device, dtype).train()
    expected = _logits_and_grads(reference, batch, real)
    results = {}
    for backend in backends:
        model = KosmosModel(dataclasses.replace(cfg, attention=backend)).to(device, dtype).train()
        model.load_state_dict(reference.state_dict())
        try:
            logits, grads = _logits_and_grads(model, batch, real)
        except BACKEND_FAILURES as error:  # a backend that fails here is a finding, not the end of the run
            results[backend] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
            continue
        error = float((logits - expected[0]).float().norm() / expected[0].float().norm())
        cosine = min_gradient_cosine(grads, expected[1])
        results[backend] = {
            "ok": error < LOGITS_RELATIVE_ERROR and cosine > GRADIENT_COSINE,
            "logits_relative_error": round(error, 5),
            "min_gradient_cosine": round(cosine, 5),
        }
        del model
    return results


def min_gradient_cosine(grads: dict, reference: dict) -> float:
    """The lowest cosine similarity between a parameter's gradient and the reference's, over the
    parameters whose reference gradient is not zero up to rounding (the gradient of a key bias is
    zero in exact arithmetic: softmax does not change when a key bias adds the same to every score)."""
    import torch.nn.functional as F

    largest = max(float(g.float().norm()) for g in reference.values())
    return min(
        float(F.cosine_similarity(grads[name].float().flatten(), g.float().flatten(), dim=0))
        for name, g in reference.items()
        if float(g.float().norm()) > 1e-6 * largest
    )


def _logits_and_grads(model, batch: dict, real) -> tuple:
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[real]
    logits.float().pow(2).mean().backward()  # a gradient through every labelled and unlabelled logit
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def time_backends(model_cfg, seq_len: int, device, backends: list[str], repeats: int = 10) -> dict:
    """Attention of one layer (forward and backward) on packed rows of short documents: half of them
    one image and up to 40 tokens of text (a caption pair), half up to 40 tokens of text."""
    import torch

    from kosmos.bench.train import AttentionSteps

    text = dataclasses.replace(model_cfg.text, layers=1, attention_dropout=0.0)
    cfg = dataclasses.replace(model_cfg, text=text)
    segments = synthetic_packed_batch(cfg, rows=4, seq_len=seq_len, spread=40)["segment_ids"].to(device)
    results = {}
    for backend in ["sdpa", *backends]:
        try:
            steps = AttentionSteps(cfg, backend, segments, torch.bfloat16, warmup=2)
            results[backend] = {
                "ms": round(1000 * statistics.median(timed(steps, device) for _ in range(repeats)), 3)
            }
        except BACKEND_FAILURES as error:
            results[backend] = {"error": f"{type(error).__name__}: {error}"[:500]}
    reference = results["sdpa"].get("ms")
    for result in results.values():
        if reference and "ms" in result:
            result["speedup_vs_sdpa"] = round(reference / result["ms"], 2)
    return results


def _subcommand(args: argparse.Namespace, command: list[str], deadline: float, *overrides: str) -> dict:
    """One `kosmos bench ... --json` in a process of its own, within what is left of the budget."""
    left = deadline - time.monotonic()
    if left < 30:
        return {"skipped": "out of time budget"}
    # Overrides last: argparse takes the positional key=value list in one piece, after the options.
    full = [sys.executable, "-m", "kosmos", "bench", *command, "--config", args.config, "--json"]
    full += [*args.overrides, *overrides]
    try:
        run = subprocess.run(full, capture_output=True, text=True, timeout=left, check=False)
    except subprocess.TimeoutExpired:
        return {
            "skipped": f"did not finish in the {left:.0f} s left of the budget",
            "command": " ".join(full),
        }
    if run.returncode:
        return {"error": run.stderr[-2000:], "command": " ".join(full)}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _save(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _print_summary(report: dict) -> None:
    print(f"{report['machine']}, torch {report['torch']}, CUDA {report['cuda']}")
    for backend, check in report["attention_checks"].items():
        print(f"attention {backend:>9}: {'ok' if check['ok'] else 'FAILED'} {check}")
    for backend, result in report["attention_times"].items():
        print(f"attention {backend:>9}: {result}")
    for stage, result in report["train"].items():
        ours = result.get("ours", result)
        keys = ("tokens_per_s", "mfu_language", "mfu_training_logs", "peak_memory_gb", "skipped", "error")
        print(f"train {stage}: " + ", ".join(f"{k} {ours[k]}" for k in keys if k in ours))
    ours = report["generate"].get("ours", report["generate"])
    print(f"generate: {ours}")
