"""`kosmos bench {train,generate,data}`: throughput benchmarks, run from a training or model config.

Each benchmark warms up, times a fixed amount of work, and prints a table (or one JSON object with
`--json`). Rates are per second of wall time on this machine; `--hf` puts `transformers`' Kosmos-2
(SDPA attention) with the same weights beside ours in the same run, alternating the two so that both
see the same machine load, and reports `speedup`: their time over ours.

- train: optimizer steps of the DeepSpeed engine the trainer builds (same ZeRO stage, precision,
  optimizer, activation checkpointing, `train.compile`), on synthetic batches of the configured
  shape: tokens/s, samples/s, step time, peak memory, and MFU with `flops_utilisation`, the formula
  of the training logs, its language and vision terms apart. `--memory` (CUDA only): per ZeRO stage,
  the largest micro-batch that fits with and without activation checkpointing, and how few layers
  need checkpointing at the configured micro-batch.
- generate: greedy decoding with a KV cache of `--new-tokens` tokens after a prompt of one image and
  some text (it never stops early); `--compile` runs the decoding steps of both sides compiled.
- data: the training loader (tokenizing, CLIP preprocessing, packing, its workers) against a bare
  loop that only reads the same shards and decodes and resizes their images, in the same run.

`--config` is a training YAML, or a model YAML, which runs inside a training config's defaults
(micro-batch 1, the model's context length). Overrides use the training config's keys either way
(`data.micro_batch_size=8`, `deepspeed.zero_stage=3`, `train.compile=true`, `model.text.layers=2`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from kosmos.cli import non_negative_int, positive_int

NEVER = -1  # an end-of-sequence id no token has: benchmarked generations run their full length


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="throughput benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)

    train = benches.add_parser("train", help="training steps (DeepSpeed engine, synthetic batches)")
    _common(train, steps=10, warmup=3)
    train.add_argument(
        "--images-per-row", type=positive_int, default=1, help="images in each row (default 1)"
    )
    train.add_argument(
        "--memory",
        action="store_true",
        help="CUDA: per ZeRO stage, the largest micro-batch that fits with and without activation "
        "checkpointing, and the fewest checkpointed layers the configured micro-batch needs",
    )
    train.add_argument(
        "--max-micro-batch", type=positive_int, default=64, help="--memory searches up to this"
    )
    train.add_argument(
        "--profile",
        metavar="TRACE",
        help="record the timed steps with torch.profiler: a Chrome trace to TRACE, the top operators on stderr",
    )
    train.set_defaults(handler=bench_train)

    generate = benches.add_parser("generate", help="greedy decoding with a KV cache")
    _common(generate, steps=5, warmup=1)
    generate.add_argument(
        "--batch", type=positive_int, default=1, help="prompts decoded together (default 1)"
    )
    generate.add_argument(
        "--prompt-tokens", type=positive_int, default=16, help="text tokens after the image"
    )
    generate.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated (default 64)")
    generate.add_argument(
        "--compile",
        action="store_true",
        help="decoding steps through torch.compile, both sides alike (compiled in the warm-up)",
    )
    generate.set_defaults(handler=bench_generate)

    data = benches.add_parser("data", help="the data loader against a bare decode-and-resize loop")
    data.add_argument(
        "--config", required=True, help="training YAML (its model, tokenizer and data sections)"
    )
    data.add_argument(
        "--steps", type=positive_int, default=20, help="timed optimizer steps of data (default 20)"
    )
    data.add_argument(
        "--warmup", type=non_negative_int, default=2, help="untimed steps first (worker start-up)"
    )
    data.add_argument("--json", action="store_true", help="print one JSON object")
    data.add_argument(
        "--serve", choices=("http", "s3"), help="read the corpora through a local HTTP or S3 server (127.0.0.1)"
    )
    data.add_argument("overrides", nargs="*", help="config overrides, e.g. data.num_workers=0")
    data.set_defaults(handler=bench_data)


def _common(parser: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    parser.add_argument("--config", required=True, help="training YAML or model YAML")
    parser.add_argument(
        "--steps", type=positive_int, default=steps, help=f"timed repetitions (default {steps})"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=warmup, help=f"untimed ones first (default {warmup})"
    )
    parser.add_argument("--hf", action="store_true", help="also time transformers' Kosmos-2, alternating")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides")


# ----------------------------------------------------------------------------------------------
# Configuration, batches, timing


def load_bench_config(path: str | Path, overrides: list[str]):
    """A training config from a training YAML, or around a model YAML (see the module docstring)."""
    from kosmos import config as config_io
    from kosmos.model import load_model_config
    from kosmos.train.config import TrainConfig, load_train_config

    if "model" in config_io.read_yaml(path):
        return load_train_config(path, overrides)
    model = config_io.to_dict(load_model_config(path))
    data = {
        "model": model,
        "tokenizer": "",
        # Benchmarks make their own batches: the corpus is a placeholder that is never read.
        "data": {
            "seq_len": model["text"]["max_positions"],
            "micro_batch_size": 1,
            "corpora": [{"kind": "text", "path": "", "tokens_per_step": 1}],
        },
    }
    return config_io.from_dict(TrainConfig, config_io.apply_overrides(data, overrides))


def synthetic_batch(model_cfg, rows: int, seq_len: int, images_per_row: int, seed: int = 0) -> dict:
    """A batch of the training contract (DESIGN section 3): one document per row filling it,
    `<s> text (<image> slots </image> text)* </s>` with random token ids and images."""
    import torch

    from kosmos.config import ConfigError
    from kosmos.tokenizer import BOS, EOS, FIRST_IMAGE_SLOT_ID, SPECIAL_SYMBOLS, Encoded

    queries, vocab = model_cfg.connector.num_queries, model_cfg.text.vocab_size
    first_special = vocab - len(SPECIAL_SYMBOLS)
    boi = first_special + SPECIAL_SYMBOLS.index("<image>")
    eoi = first_special + SPECIAL_SYMBOLS.index("</image>")
    text = seq_len - 2 - images_per_row * (queries + 2)
    if text < images_per_row + 1:
        raise ConfigError(f"data.seq_len: {seq_len} positions cannot hold {images_per_row} images per row")
    generator = torch.Generator().manual_seed(seed)
    chunks = [
        text // (images_per_row + 1) + (i < text % (images_per_row + 1)) for i in range(images_per_row + 1)
    ]
    slots = list(range(FIRST_IMAGE_SLOT_ID, FIRST_IMAGE_SLOT_ID + queries))
    encoded = []
    for _ in range(rows):
        ids, image_mask = [BOS], [False]
        for i, length in enumerate(chunks):
            ids += torch.randint(FIRST_IMAGE_SLOT_ID, first_special, (length,), generator=generator).tolist()
            image_mask += [False] * length
            if i < images_per_row:
                ids += [boi, *slots, eoi]
                image_mask += [False, *[True] * queries, False]
        ids.append(EOS)
        image_mask.append(False)
        encoded.append(Encoded(ids, image_mask, [True] * len(ids), images_per_row))
    size = model_cfg.vision.image_size
    return {
        "input_ids": torch.tensor([e.ids for e in encoded]),
        "image_mask": torch.tensor([e.image_mask for e in encoded]),
        "images": torch.randn(rows * images_per_row, 3, size, size, generator=generator),
        "labels": torch.tensor([e.labels() for e in encoded]),
        "position_ids": torch.arange(seq_len).expand(rows, -1).contiguous(),
        "segment_ids": torch.ones(rows, seq_len, dtype=torch.long),
    }


def transformers_twin(model):
    """`transformers`' Kosmos2ForConditionalGeneration (SDPA attention) with our model's weights and
    the same set of trainable parameters."""
    from transformers import Kosmos2ForConditionalGeneration

    from kosmos.convert import to_hf_config, to_hf_state_dict

    config = to_hf_config(model.cfg)
    twin = Kosmos2ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    missing, unexpected = twin.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    if unexpected or set(missing) != {"text_model.lm_head.weight"}:  # the head is tied to the embeddings
        raise RuntimeError(f"transformers twin: missing {missing}, unexpected {unexpected}")
    trainable = to_hf_state_dict({n: p for n, p in model.named_parameters() if p.requires_grad})
    for name, param in twin.named_parameters():
        param.requires_grad_(name in trainable)
    ours_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    theirs_count = sum(p.numel() for p in twin.parameters() if p.requires_grad)
    if ours_count != theirs_count:
        raise RuntimeError(f"transformers twin trains {theirs_count} parameters, ours {ours_count}")
    return twin


def transformers_inputs(batch: dict) -> dict:
    """Our batch as Kosmos-2 arguments (one document per row; its labels are not yet shifted)."""
    import torch

    from kosmos.tokenizer import IGNORE_INDEX

    labels = batch.get("labels")
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": (batch["segment_ids"] > 0).long(),
        "image_embeds_position_mask": batch["image_mask"].long(),
        "pixel_values": batch["images"],
    }
    if labels is not None:
        inputs["labels"] = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], 1)
    return inputs


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def measure_peak_flops(device, dtype) -> float:
    """FLOP/s of large square matmuls in `dtype`: the peak this device reaches right now."""
    import torch

    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    seconds = [_timed(lambda: a @ b, device) for _ in range(20 if device.type == "cuda" else 5)]
    return 2 * n**3 / statistics.median(seconds)


def _memory_gb(device) -> float:
    from kosmos.train.metrics import peak_memory_gb

    return round(peak_memory_gb(device), 3)


def _machine(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{platform.machine()} CPU, {_cpu_count()} cores, {torch.get_num_threads()} threads, load {_load()}"
    )


def _load() -> str:
    import os

    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------
# Training


def bench_train(args: argparse.Namespace) -> int:
    cfg = load_bench_config(args.config, args.overrides)
    if args.memory:
        return _memory_sweep(args, cfg)
    if args.hf and args.images_per_row < 1:
        print(
            "kosmos bench train: --hf needs --images-per-row of 1 or more (Kosmos-2 wants images)",
            file=sys.stderr,
        )
        return 2
    import warnings

    import torch

    from kosmos.model import KosmosModel, attention_pairs, training_flops
    from kosmos.tokenizer import IGNORE_INDEX
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
    memory = {"ours": _memory_gb(device)}  # before the twin trains: ours alone
    if twin is not None:
        if cfg.deepspeed.activation_checkpointing:  # all of its layers: it has no partial setting
            twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        runs["theirs"] = TrainSteps(build_engine(cfg, twin, 1, bf16), transformers_inputs(batch), args.warmup)
        # On a GPU, its peak less what ours holds; on CPU the process's peak (`ru_maxrss`) only grows.
        memory["theirs"] = round(_memory_gb(device) - resident / 2**30, 3) if device.type == "cuda" else None
    with _profiler(args.profile, device):
        seconds = _alternate(runs, args.steps, device)
    torch.distributed.destroy_process_group()
    if not env.is_main:
        return 0

    dtype = torch.bfloat16 if bf16 else torch.float32
    measured_peak = env.world_size * measure_peak_flops(device, dtype)
    logged_peak = peak_flops(cfg.logging, device, bf16)
    report = {
        "benchmark": "train",
        "config": str(args.config),
        "machine": _machine(device),
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
        "attention": model.attention_backend(device, dtype),
        "steps": args.steps,
        "peak_tflops_measured": round(measured_peak / env.world_size / 1e12, 4),
        "peak_tflops_training_logs": logged_peak and logged_peak / 1e12,
    }
    # Every rank runs the same steps on batches of the same shape: rates count all of them.
    positions = env.world_size * rows * seq_len
    images = env.world_size * rows * args.images_per_row
    labelled = env.world_size * int((batch["labels"] != IGNORE_INDEX).sum())
    per_document = report["attention"] == "flash"
    attention = env.world_size * float(attention_pairs(batch["segment_ids"], per_document).sum())
    flops = training_flops(cfg.model, positions, labelled, images, attention)
    for side, times in seconds.items():
        step_s = statistics.median(times)
        mfu = flops_utilisation(flops, step_s, measured_peak)
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
            logged = flops_utilisation(flops, step_s, env.world_size * logged_peak)
            report[side]["mfu_training_logs"] = round(logged["language"] + logged["vision"], 4)
    if twin is not None:
        report["speedup"] = round(report["theirs"]["step_s"] / report["ours"]["step_s"], 3)
    columns = ["step_s", "tokens_per_s", "samples_per_s", "peak_memory_gb", "mfu_language", "mfu_vision"]
    _print_report(report, args.json, [*columns, "first_loss"])
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


def _alternate(runs: dict, repeats: int, device) -> dict[str, list[float]]:
    """Seconds of each run, interleaved so that every run sees the same load on a shared machine."""
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(_timed(run, device))
    return seconds


def _print_report(report: dict, as_json: bool, columns: list[str]) -> None:
    if as_json:
        print(json.dumps(report))
        return
    sides = [side for side in ("ours", "theirs") if side in report]
    for key, value in report.items():
        if key not in sides and key != "speedup":
            print(f"{key}: {value}")
    print(f"{'':>8} " + " ".join(f"{c:>15}" for c in columns))
    for side in sides:
        print(f"{side:>8} " + " ".join(f"{_cell(report[side].get(c)):>15}" for c in columns))
    if "speedup" in report:
        print(f"speedup (theirs / ours time): {report['speedup']:.2f}x")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _memory_sweep(args: argparse.Namespace, cfg) -> int:
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
            size, found = _largest_that_fits(tries, args.max_micro_batch)
            results.append(_memory_row(stage, size, checkpointed, found))
        checkpointed, found = _fewest_that_fit(functools.partial(attempt, stage, micro_batch), layers)
        results.append(_memory_row(stage, micro_batch if found else 0, checkpointed, found))

    device = torch.device("cuda")
    report = {
        "benchmark": "train --memory",
        "config": str(args.config),
        "machine": _machine(device),
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
            f"{_cell(r['peak_memory_gb']):>8} {_cell(r['tokens_per_s']):>10} {_cell(r['mfu_language']):>8}"
        )
    return 0


def _largest_that_fits(fits, cap: int) -> tuple[int, dict | None]:
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


def _fewest_that_fit(fits, most: int) -> tuple[int | None, dict | None]:
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


# ----------------------------------------------------------------------------------------------
# Generation


def bench_generate(args: argparse.Namespace) -> int:
    import torch

    from kosmos.model import KosmosModel, generate
    from kosmos.model.kosmos import compile_for_decoding
    from kosmos.tokenizer import Encoded
    from kosmos.train.engine import use_bf16

    cfg = load_bench_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if use_bf16(cfg.deepspeed.bf16) else torch.float32
    length = args.prompt_tokens + cfg.model.connector.num_queries + 4  # <s> <image> </image> </s>
    batch = synthetic_batch(cfg.model, args.batch, length, 1)
    prompts = [
        Encoded(ids[:-1], mask[:-1], [True] * (length - 1), 1)  # without </s>: a prompt to continue
        for ids, mask in zip(batch["input_ids"].tolist(), batch["image_mask"].tolist())
    ]
    images = batch["images"].to(device, dtype)

    torch.manual_seed(cfg.train.seed)
    model = KosmosModel(cfg.model).eval()
    runs = {
        "ours": lambda: generate(
            model, prompts, images, max_new_tokens=args.new_tokens, eos_id=NEVER, compile=args.compile
        )
    }
    if args.hf:
        from kosmos.model import pad_batch

        twin = transformers_twin(model).to(device, dtype).eval()
        twin.generation_config.eos_token_id = None  # decode the full length, as ours does here
        if args.compile:  # Kosmos-2's generate runs its text model, compiled here as ours is
            twin.text_model.forward = compile_for_decoding(twin.text_model.forward, device.type)
        inputs = transformers_inputs({**pad_batch(prompts, "left", device), "images": images})

        def theirs() -> list[list[int]]:
            out = twin.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, num_beams=1)
            return out[:, inputs["input_ids"].shape[1] :].tolist()

        runs["theirs"] = theirs
    model.to(device, dtype)

    outputs = {}
    for side, run in runs.items():
        for _ in range(max(1, args.warmup)):  # at least one: its tokens are compared
            outputs[side] = run()
    seconds = _alternate(runs, args.steps, device)

    tokens = args.batch * args.new_tokens
    report = {
        "benchmark": "generate",
        "config": str(args.config),
        "machine": _machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "prompt_length": length - 1,
        "new_tokens": args.new_tokens,
        "compile": args.compile,
        "runs": args.steps,
    }
    for side, times in seconds.items():
        call_s = statistics.median(times)
        report[side] = {
            "call_s": round(call_s, 4),
            "ms_per_token": round(1000 * call_s / args.new_tokens, 3),
            "tokens_per_s": round(tokens / call_s, 1),
            "samples_per_s": round(args.batch / call_s, 3),
        }
    report["ours"]["peak_memory_gb"] = _memory_gb(device)
    if args.hf:
        report["same_tokens"] = outputs["ours"] == outputs["theirs"]
        report["speedup"] = round(report["theirs"]["call_s"] / report["ours"]["call_s"], 3)
    _print_report(report, args.json, ["call_s", "ms_per_token", "tokens_per_s", "samples_per_s"])
    return 0


# ----------------------------------------------------------------------------------------------
# Data


def bench_data(args: argparse.Namespace) -> int:
    from kosmos.data import build_loader
    from kosmos.data.serve import serve_corpora
    from kosmos.tokenizer import Tokenizer
    from kosmos.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    tokenizer = Tokenizer(cfg.tokenizer)
    image_size = cfg.model.vision.image_size
    samples: Counter[str] = Counter()
    tokens = images = 0
    with serve_corpora(cfg.data, args.serve) as data:
        loader = build_loader(data, tokenizer, image_size, cfg.model.connector.num_queries)
        steps = iter(loader)
        for _ in range(args.warmup):
            next(steps)
        start = time.perf_counter()
        for _ in range(args.steps):
            for batch in next(steps):
                tokens += int((batch["segment_ids"] > 0).sum())
                images += len(batch["images"])
            samples.update(ref.corpus for ref in loader.last_step_samples)
        loader_seconds = time.perf_counter() - start
        del steps  # stops the loader's workers before the bare loop runs

    start = time.perf_counter()
    bare_images = sum(
        bare_decode_and_resize(Path(corpus.path), samples[corpus.name], image_size)
        for corpus in cfg.data.corpora
    )
    bare_seconds = time.perf_counter() - start

    total = sum(samples.values())
    report = {
        "benchmark": "data",
        "config": str(args.config),
        "machine": f"{platform.machine()} CPU, {_cpu_count()} cores",
        "num_workers": cfg.data.num_workers,
        "source": args.serve or "local",
        "steps": args.steps,
        "samples": dict(samples),
        "loader": _rates(total, tokens, images, loader_seconds),
        # Same number of samples from each corpus; tokens are the loader's, i.e. the rate the loader
        # would reach if tokenizing and packing were free.
        "bare": _rates(total, tokens, bare_images, bare_seconds),
    }
    report["loader_vs_bare"] = round(report["loader"]["samples_per_s"] / report["bare"]["samples_per_s"], 3)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{report['machine']}, num_workers={cfg.data.num_workers}, {args.steps} steps, samples {dict(samples)}"
    )
    print(f"{'':>8} {'seconds':>9} {'samples/s':>10} {'tokens/s':>10} {'images/s':>9}")
    for name in ("loader", "bare"):
        r = report[name]
        print(
            f"{name:>8} {r['seconds']:>9.2f} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} {r['images_per_s']:>9.1f}"
        )
    print(f"loader / bare samples/s: {report['loader_vs_bare']:.2f}")
    return 0


def bare_decode_and_resize(folder: Path, num_samples: int, image_size: int) -> int:
    """Read `num_samples` samples of a corpus in shard order (cycling), decode text and JSON, decode
    and CLIP-resize images; nothing else. Returns the number of images."""
    from webdataset.tariterators import base_plus_ext

    from kosmos.data.decode import decode_image, image_transform
    from kosmos.data.shards import IMAGE_EXTENSIONS, read_index

    transform = image_transform(image_size)
    shards = [folder / shard.name for shard in read_index(folder).shards]
    seen, images, key = 0, 0, None
    while seen < num_samples:
        for shard in shards:
            with tarfile.open(shard, mode="r|") as tar:
                for member in tar:
                    name_key, suffix = base_plus_ext(member.name)
                    if name_key != key:
                        if seen == num_samples:
                            return images
                        key, seen = name_key, seen + 1
                    data = tar.extractfile(member).read()
                    extension = suffix.rsplit(".", 1)[-1]
                    if extension in IMAGE_EXTENSIONS:
                        transform(decode_image(data))
                        images += 1
                    elif extension == "json":
                        json.loads(data)
                    else:
                        data.decode("utf-8")
    return images


def _rates(samples: int, tokens: int, images: int, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "images_per_s": round(images / seconds, 2),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))
