"""`kosmos bench gpu`: one command that checks and measures the CUDA path, within a time budget.

1. attention: every packed-row backend against the dense-mask reference, in bf16 on packed rows of
   the configured model (two decoder layers, no dropout): logits and gradients; then each one's
   attention time over all the model's layers for one mask preparation (forward and backward, as a
   training step spends it) on packed rows of short documents, at the configured shapes and
   sequence length.
2. train: `kosmos bench train` of the configured model for a few steps per ZeRO stage (tokens/s, MFU,
   peak memory) on rows of one document, and once more at ZeRO-2 on packed rows; each in a process
   of its own so that one run's memory does not stay for the next.
3. generate: `kosmos bench generate` (greedy decoding with a KV cache, a batch of prompts).

Everything goes into one JSON file, written after every part; a part that fails records its error
there and the run goes on; a part that does not fit in the remaining budget is recorded as skipped.
MFU is against the GPU's spec peak (the training logs' convention; `mfu_peak` says which), the
measured matmul peak beside it. Without a CUDA device it prints that it skipped and exits 0;
`--device cpu` runs every part on the CPU instead (for a tiny config: the whole logic, no figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from kosmos.bench.common import load_bench_config, machine, synthetic_packed_batch, timed
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
    gpu.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: every part on the CPU (checks the logic with a tiny config; measures nothing)",
    )
    gpu.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides")
    gpu.set_defaults(handler=bench_gpu)


def bench_gpu(args: argparse.Namespace) -> int:
    import torch

    from kosmos.model.attention import BACKENDS

    if args.device == "cuda" and not torch.cuda.is_available():
        print("kosmos bench gpu: skipped, no CUDA device here (it checks and measures the GPU path)")
        return 0
    deadline = time.monotonic() + args.budget
    cfg = load_bench_config(args.config, args.overrides)
    configure_threads(setting=cfg.train.threads)
    device = torch.device(args.device)
    report = {
        "benchmark": "gpu",
        "config": str(args.config),
        "machine": machine(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seq_len": cfg.data.seq_len,
        "micro_batch": cfg.data.micro_batch_size,
    }
    backends = [name for name in BACKENDS if name != "sdpa"]  # those that cannot run here say why
    _part(report, "attention_checks", check_backends, cfg.model, device, torch.bfloat16, backends)
    _save(report, args.out)
    _part(report, "attention_times", time_backends, cfg.model, cfg.data.seq_len, device, backends)
    _save(report, args.out)
    train = ["train", "--steps", str(args.train_steps), "--warmup", "2"]
    runs = {f"zero{stage}": ([], f"deepspeed.zero_stage={stage}") for stage in args.stages.split(",")}
    runs["zero2_packed"] = (["--synthetic-packed"], "deepspeed.zero_stage=2")
    report["train"] = {}
    for name, (options, stage) in runs.items():
        _part(report["train"], name, _subcommand, args, [*train, *options], deadline, stage)
        _save(report, args.out)
    decode = ["generate", "--batch", "8", "--new-tokens", "64", "--steps", "3"]
    _part(report, "generate", _subcommand, args, decode, deadline)
    _save(report, args.out)
    _print_summary(report)
    print(f"written to {args.out}")
    return 0


def _part(report: dict, key: str, work, *arguments) -> None:
    """`report[key]` = what `work(*arguments)` returns, or the error it raised: a part that fails is
    a finding, not the end of the run."""
    try:
        report[key] = work(*arguments)
    except Exception as error:  # noqa: BLE001 - recorded in the report; the next part runs
        report[key] = {"error": f"{type(error).__name__}: {error}"[:2000]}


def check_backends(model_cfg, device, dtype, backends: list[str]) -> dict:
    """Per backend: logits and gradients on packed rows against the dense-mask reference."""
    import torch

    from kosmos.model import KosmosModel

    text = dataclasses.replace(model_cfg.text, layers=2, dropout=0.0, attention_dropout=0.0)
    vision = dataclasses.replace(model_cfg.vision, layers=min(2, model_cfg.vision.layers), weights=None)
    vision = dataclasses.replace(vision, trainable_blocks=min(vision.trainable_blocks, vision.layers))
    cfg = dataclasses.replace(model_cfg, text=text, vision=vision, attention="sdpa")
    batch = synthetic_packed_batch(cfg, rows=2, seq_len=min(1024, text.max_positions))
    batch = batch.to(device)
    batch.images = batch.images.to(dtype)
    real = batch.segment_ids > 0

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
    """The lowest cosine similarity between a parameter's gradient and the reference's, over every
    parameter but the key biases: their gradient is zero in exact arithmetic (a key bias adds the same
    to every score of a query, which softmax ignores), so what is left of it is rounding noise, whose
    direction differs between any two kernels (cosine about 0.3 in bf16)."""
    import torch.nn.functional as F

    return min(
        float(F.cosine_similarity(grads[name].float().flatten(), g.float().flatten(), dim=0))
        for name, g in reference.items()
        if not name.endswith("k_proj.bias")
    )


def _logits_and_grads(model, batch, real) -> tuple:
    model.zero_grad()
    logits = model(**dataclasses.replace(batch, labels=None).inputs()).logits[real]
    logits.float().pow(2).mean().backward()  # a gradient through every labelled and unlabelled logit
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def time_backends(model_cfg, seq_len: int, device, backends: list[str], repeats: int = 10) -> dict:
    """The attention of a training step, per backend: one preparation of the packed rows' mask, then
    every decoder layer's forward and backward, on packed rows of short documents: half of them one
    image and up to 40 tokens of text (a caption pair), half up to 40 tokens of text."""
    import torch

    from kosmos.bench.train import AttentionSteps
    from kosmos.model.attention import choose_backend

    text = dataclasses.replace(model_cfg.text, attention_dropout=0.0)
    cfg = dataclasses.replace(model_cfg, text=text)
    segments = synthetic_packed_batch(cfg, rows=4, seq_len=seq_len, spread=40).segment_ids.to(device)
    results = {}
    for backend in ["sdpa", *backends]:
        try:
            choose_backend(backend, device, torch.bfloat16, needs_grad=True, dropout=False)  # or why not
            steps = AttentionSteps(cfg, backend, segments, torch.bfloat16, warmup=2)
            seconds = statistics.median(timed(steps, device) for _ in range(repeats))
            results[backend] = {"ms": round(1000 * seconds, 3), "layers": text.layers}
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
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None  # no GPU either
    try:
        run = subprocess.run(full, capture_output=True, text=True, timeout=left, check=False, env=env)
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
    for part in ("attention_checks", "attention_times"):
        results = report[part]
        if "error" in results:
            print(f"{part}: FAILED {results['error']}")
            continue
        for backend, result in results.items():
            verdict = {True: "ok ", False: "FAILED "}.get(result.get("ok"), "")
            print(f"{part} {backend:>9}: {verdict}{result}")
    for name, result in report["train"].items():
        ours = result.get("ours", result)
        keys = ("tokens_per_s", "mfu_language", "mfu_peak", "peak_memory_gb", "skipped", "error")
        print(f"train {name}: " + ", ".join(f"{k} {ours[k]}" for k in keys if k in ours))
    ours = report["generate"].get("ours", report["generate"])
    print(f"generate: {ours}")
