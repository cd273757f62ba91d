"""`kosmos train --dry-run`: check everything a training config points at, then plan the run.

The checks are those a launch would meet minutes in, made before any compute: the config's keys
and values, the tokenizer against `model.text.vocab_size`, the first documents of every corpus read
and tokenized by the loader's own code, the step layout against the number of GPUs, and the CLIP
weights' tensor names and shapes (read from the file's header where the format allows). The model
is only ever built on the meta device.

The plan, for a cluster given on the command line (GPUs, their memory, peak FLOP/s, MFU):
- parameters, tokens per step and per rank, rows, micro-batches and gradient accumulation per rank;
- GPU memory for each ZeRO stage and offload setting, with and without activation checkpointing:
  model states from DeepSpeed's estimators, activations from `kosmos.model.memory`, for the most
  demanding micro-batch (text rows, all positions labelled, or rows packed with as many images as
  they can hold); and the largest micro-batch that fits and divides a rank's rows;
- the wall time of `train.max_steps` steps at each MFU, counting FLOPs as the training logs' MFU
  does, with the images per step estimated from the documents read.

Model states are DeepSpeed's estimates for 16-bit mixed precision, the GPUs' setting
(`deepspeed.bf16: auto`); with `deepspeed.bf16: false` the plan counts 4-byte activations but keeps
those estimates, which then fall short.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys

from kosmos.config import ConfigError
from kosmos.model import ModelConfig
from kosmos.train.config import TrainConfig, input_problems

GB = 2**30
# Left for the CUDA context and the allocator's fragmentation, which no estimate counts.
USABLE_MEMORY = 0.9
# ZeRO settings planned: (stage, offload)
ZERO_SETTINGS = ((1, False), (2, False), (2, True), (3, False), (3, True))


@dataclasses.dataclass
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu_memory_gb: float
    peak_tflops: float
    mfu: list[float]
    attention: str  # the attention backend the GPUs will train with (kosmos.model.attention)

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


# ----------------------------------------------------------------------------------------------
# Validation


def probe_corpora(cfg: TrainConfig, indexes: dict, tokenizer, documents: int) -> dict[str, dict]:
    """Read the first `documents` usable documents of every corpus (`indexes` by name) with the
    loader's code."""
    from kosmos.data import DataError
    from kosmos.data.loader import corpus_reader
    from kosmos.data.skips import saved

    model = cfg.model
    probes = {}
    for i, corpus in enumerate(cfg.data.corpora):
        index = indexes[corpus.name]
        positions = images = labelled = 0
        reader = corpus_reader(
            cfg.data, corpus, index, tokenizer, model.vision.image_size, model.connector.num_queries
        )
        try:
            with reader as stream:
                for _ in range(min(documents, index.num_samples)):
                    document, _ = stream.next_document()
                    positions += len(document)
                    images += len(document.images)
                    labelled += int((document.labels != -100).sum())
        except DataError as error:
            raise ConfigError(f"data.corpora[{i}].path: {error}") from None
        probes[corpus.name] = {
            "path": corpus.path,
            "samples": index.num_samples,
            "shards": len(index.shards),
            "documents_read": min(documents, index.num_samples),
            "positions": positions,
            "images": images,
            "labelled": labelled,
            "skipped": saved(stream.skipped),
        }
    return probes


def validate(cfg: TrainConfig, world_size: int, documents: int) -> dict:
    """Every check a launch on `world_size` ranks would make before training; ConfigError if not,
    naming every problem found."""
    from kosmos import config as config_io
    from kosmos.data.config import rows_per_step, stream_layout
    from kosmos.data.shards import read_index
    from kosmos.model import VisionWeightsError, check_vision_weights
    from kosmos.tokenizer import Tokenizer

    problems = input_problems(cfg, world_size)
    vision = cfg.model.vision
    tensors = None
    if vision.weights is not None:
        try:
            tensors = check_vision_weights(vision)
        except VisionWeightsError as error:
            problems.append(f"model.vision.weights: {error}")
    config_io.raise_problems(problems)
    tokenizer = Tokenizer(cfg.tokenizer)
    indexes = {corpus.name: read_index(corpus.path) for corpus in cfg.data.corpora}
    _, virtual = stream_layout(cfg.data, world_size)
    rows = rows_per_step(cfg.data, indexes, world_size, cfg.model.connector.num_queries, virtual)
    return {
        "tokenizer": {"path": cfg.tokenizer, "pieces": tokenizer.num_pieces, "vocab_size": tokenizer.vocab_size},
        "vision_weights": {"path": vision.weights, "tensors": tensors},
        "corpora": probe_corpora(cfg, indexes, tokenizer, documents),
        "rows_per_rank": rows,
    }


# ----------------------------------------------------------------------------------------------
# Memory


def parameter_layout(cfg: ModelConfig) -> dict[str, int]:
    """Total, trainable and frozen parameters, and the largest module's own (ZeRO-3 gathers it whole)."""
    import torch

    from kosmos.model import KosmosModel

    with torch.device("meta"):
        model = KosmosModel(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, weights=None)))
    # `parameters()` yields the tied embedding once.
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "largest_module": largest}


def model_state_bytes(params: dict[str, int], stage: int, offload: bool, cluster: Cluster) -> dict[str, int]:
    """GPU and host bytes per GPU / per node of parameters, gradients and optimizer states.

    Trainable parameters: DeepSpeed's estimators (bf16 weights and gradients, fp32 master weights,
    gradients and Adam moments; `additional_buffer_factor` 1.5 on host memory, their default). Stage 1
    has no estimator: it is stage 2's with the 16-bit gradients whole on every GPU. Frozen
    parameters (the CLIP tower but its last blocks): bf16 weights only, partitioned by stage 3 and
    held in host memory when it offloads parameters.
    """
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the plan's; DeepSpeed logs on import
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    trainable, frozen = params["trainable"], params["frozen"]
    nodes, per_node = cluster.nodes, cluster.gpus_per_node
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, params["largest_module"], per_node, nodes, cpu_offload=offload, cpu_offload_params=offload
        )
        gpu += 0 if offload else 2 * frozen // cluster.gpus
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, per_node, nodes, cpu_offload=offload)
        if stage == 1:
            gpu += 2 * trainable - 2 * trainable // cluster.gpus
        gpu += 2 * frozen
    return {"gpu": int(gpu), "host_per_node": int(cpu)}


def communication_buffer_bytes(cfg: TrainConfig, stage: int, offload: bool) -> int:
    """DeepSpeed's gradient buckets on each GPU, from the stage's DeepSpeed config (with
    `deepspeed.extra`): ZeRO-1/2 reduce gradients through a bucket of `reduce_bucket_size` 16-bit
    elements, two of them while the next fills (`overlap_comm`); ZeRO-3 through its reduce bucket
    and its parameter prefetch bucket."""
    from kosmos.train.engine import deepspeed_config

    settings = dataclasses.replace(cfg.deepspeed, zero_stage=stage, offload=offload)
    zero = deepspeed_config(dataclasses.replace(cfg, deepspeed=settings), 1, bf16=True)["zero_optimization"]
    if stage == 3:
        return 2 * (zero.get("reduce_bucket_size", 0) + zero.get("stage3_prefetch_bucket_size", 0))
    return 2 * zero.get("reduce_bucket_size", 0) * (2 if zero.get("overlap_comm") else 1)


def worst_micro_batch(cfg: TrainConfig, rows: int, **memory) -> int:
    """Peak activation bytes of the most demanding micro-batch of `rows` rows: all text, every
    position labelled; or rows packed with images (the most a row can hold: a caption pair needs
    `<s>`, `<image>`, the slots, `</image>`, a token of text and `</s>`)."""
    from kosmos.model.memory import activation_memory

    seq_len, queries = cfg.data.seq_len, cfg.model.connector.num_queries
    has_images = any(corpus.kind != "text" for corpus in cfg.data.corpora)
    images_per_row = seq_len // (queries + 5) if has_images else 0
    text = activation_memory(cfg.model, rows, seq_len, 0, rows * seq_len, **memory)["peak"]
    labelled = rows * (seq_len - images_per_row * (queries + 2))
    pictures = activation_memory(cfg.model, rows, seq_len, rows * images_per_row, labelled, **memory)["peak"]
    return max(text, pictures)


def memory_table(cfg: TrainConfig, params: dict[str, int], rows_per_rank: int, cluster: Cluster) -> list[dict]:
    bf16 = cfg.deepspeed.bf16 is not False
    memory = {"dtype_bytes": 2 if bf16 else 4, "backend": cluster.attention, "mask_bytes": 1}
    usable = USABLE_MEMORY * cluster.gpu_memory_gb * GB
    micro_batch = cfg.data.micro_batch_size
    divisors = [d for d in range(1, rows_per_rank + 1) if rows_per_rank % d == 0]
    table = []
    for stage, offload in ZERO_SETTINGS:
        estimate = model_state_bytes(params, stage, offload, cluster)
        buffers = communication_buffer_bytes(cfg, stage, offload)
        states = estimate["gpu"] + buffers
        for checkpointing in (False, True):
            layers = cfg.model.text.layers if checkpointing else 0
            # The configured micro-batch is one of the divisors (the step layout was checked).
            needs = {d: states + worst_micro_batch(cfg, d, checkpointed_layers=layers, **memory) for d in divisors}
            total = needs[micro_batch]
            table.append(
                {
                    "zero_stage": stage,
                    "offload": offload,
                    "activation_checkpointing": checkpointing,
                    "model_states_gb": round(estimate["gpu"] / GB, 2),
                    "communication_buffers_gb": round(buffers / GB, 2),
                    "activations_gb": round((total - states) / GB, 2),
                    "total_gb": round(total / GB, 2),
                    "fits": total <= usable,
                    "largest_micro_batch": max((d for d, need in needs.items() if need <= usable), default=0),
                    "host_gb_per_node": round(estimate["host_per_node"] / GB, 1),
                }
            )
    return table


# ----------------------------------------------------------------------------------------------
# Time


def step_flops(cfg: TrainConfig, probes: dict[str, dict]) -> dict[str, float]:
    """FLOPs of one optimizer step as the training logs count them (`kosmos.model.training_flops`), at
    the density of images and labelled positions of the documents read; attention is counted over whole
    rows (an upper bound for backends that attend per document)."""
    from kosmos.model import training_flops

    positions = sum(corpus.tokens_per_step for corpus in cfg.data.corpora)
    images = labelled = 0.0
    for corpus in cfg.data.corpora:
        probe = probes[corpus.name]
        if probe["positions"]:
            images += corpus.tokens_per_step * probe["images"] / probe["positions"]
            labelled += corpus.tokens_per_step * probe["labelled"] / probe["positions"]
    flops = training_flops(cfg.model, positions, labelled, images, positions * cfg.data.seq_len)
    return {"images_per_step": images, **flops, "total": flops["language"] + flops["vision"]}


# ----------------------------------------------------------------------------------------------
# The whole plan


def plan(cfg: TrainConfig, cluster: Cluster, documents: int = 16) -> dict:
    """Validate `cfg` for `cluster.gpus` ranks, then the plan (a JSON-able dict); ConfigError if invalid."""
    checks = validate(cfg, cluster.gpus, documents)
    params = parameter_layout(cfg.model)
    rows = checks["rows_per_rank"]
    rows_per_rank = sum(rows.values())
    tokens = sum(corpus.tokens_per_step for corpus in cfg.data.corpora)
    flops = step_flops(cfg, checks["corpora"])
    peak = cluster.gpus * cluster.peak_tflops * 1e12
    steps = cfg.train.max_steps
    timing = []
    for mfu in cluster.mfu:
        step_s = flops["total"] / (peak * mfu)
        timing.append({"mfu": mfu, "step_s": round(step_s, 3), "days": round(steps * step_s / 86400, 2)})
    return {
        "checks": checks,
        "cluster": dataclasses.asdict(cluster) | {"nodes": cluster.nodes},
        "bf16": cfg.deepspeed.bf16 is not False,
        "parameters": params,
        "step": {
            "tokens": tokens,
            "tokens_per_rank": tokens // cluster.gpus,
            "seq_len": cfg.data.seq_len,
            "rows_per_rank": rows,
            "micro_batch_size": cfg.data.micro_batch_size,
            "gradient_accumulation": rows_per_rank // cfg.data.micro_batch_size,
        },
        "memory_per_gpu": memory_table(cfg, params, rows_per_rank, cluster),
        "flops_per_step": {k: round(v, 1) if k == "images_per_step" else v for k, v in flops.items()},
        "time": {"steps": steps, "at_mfu": timing},
    }


def format_plan(report: dict) -> str:
    """The plan as text for a terminal."""
    checks, cluster, step = report["checks"], report["cluster"], report["step"]
    params = report["parameters"]
    tok = checks["tokenizer"]
    lines = [
        "config checked: keys, tokenizer, corpora, step layout and vision weights",
        f"  tokenizer {tok['path']}: {tok['pieces']:,} pieces, vocabulary {tok['vocab_size']:,}",
    ]
    for name, probe in checks["corpora"].items():
        lines.append(
            f"  corpus {name} ({probe['path']}): {probe['samples']:,} samples in {probe['shards']:,} shards; "
            f"{probe['documents_read']} documents read: {probe['positions']:,} positions, "
            f"{probe['images']} images, skipped {probe['skipped'] or 'none'}"
        )
    weights = checks["vision_weights"]
    lines.append(
        f"  vision weights {weights['path']}: {weights['tensors']} tensors of the configured shapes"
        if weights["path"]
        else "  vision weights: none (random initialisation)"
    )
    lines += [
        f"parameters: {params['total']:,} total, {params['trainable']:,} trainable, {params['frozen']:,} frozen",
        (f"cluster: {cluster['gpus']} GPUs ({cluster['nodes']} nodes of {cluster['gpus_per_node']}), "
        f"{cluster['gpu_memory_gb']:g} GB each, peak {cluster['peak_tflops']:g} TFLOP/s, "
        f"attention kernel {cluster['attention']}, {'bf16' if report['bf16'] else 'fp32'}"),
        f"step: {step['tokens']:,} tokens in rows of {step['seq_len']}; per rank {step['tokens_per_rank']:,} "
        f"tokens = " + ", ".join(f"{n} {name}" for name, n in step["rows_per_rank"].items()) + " rows; "
        f"micro-batch {step['micro_batch_size']} -> gradient accumulation {step['gradient_accumulation']}",
        (f"memory per GPU (GB; activations of micro-batch {step['micro_batch_size']}; fits: within "
        f"{USABLE_MEMORY:.0%} of {cluster['gpu_memory_gb']:g} GB):"),
        (f"  {'ZeRO':>4} {'offload':>7} {'ckpt':>5} {'states':>7} {'activ.':>7} {'total':>7} {'fits':>5} "
        f"{'largest micro-batch':>19} {'host GB/node':>12}"),
    ]
    for row in report["memory_per_gpu"]:
        lines.append(
            f"  {row['zero_stage']:>4} {'yes' if row['offload'] else 'no':>7} "
            f"{'all' if row['activation_checkpointing'] else 'none':>5} {row['model_states_gb']:>7.2f} "
            f"{row['activations_gb']:>7.2f} {row['total_gb']:>7.2f} {'yes' if row['fits'] else 'no':>5} "
            f"{row['largest_micro_batch']:>19} {row['host_gb_per_node']:>12.1f}"
        )
    flops = report["flops_per_step"]
    lines.append(
        f"FLOPs per step: {flops['total']:.3g} (language {flops['language']:.3g}, vision {flops['vision']:.3g} "
        f"for about {flops['images_per_step']:,.0f} images)"
    )
    for at in report["time"]["at_mfu"]:
        lines.append(
            f"  at MFU {at['mfu']:.0%}: {at['step_s']:.2f} s per step, {report['time']['steps']:,} steps in "
            f"{at['days']:.1f} days"
        )
    return "\n".join(lines)


def training_backend(cfg: TrainConfig) -> str:
    """The attention backend `model.attention` trains with on a GPU, with the packages installed here
    (`auto` resolved; a named one as named, which the GPU node may have where this machine has not)."""
    import torch

    from kosmos.model.attention import choose_backend

    if cfg.model.attention != "auto":
        return cfg.model.attention
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 is not False else torch.float32
    dropout = cfg.model.text.attention_dropout > 0
    return choose_backend("auto", torch.device("cuda"), dtype, needs_grad=True, dropout=dropout)


def dry_run(args) -> int:
    """`kosmos train --dry-run`: validate and print the plan (exit 0), or raise ConfigError (exit 2).

    The options, the config's keys and the files it names are checked before torch is imported, and
    all their problems are reported together."""
    import json

    from kosmos import config as config_io

    problems = []
    for name in ("gpus", "gpus_per_node", "probe_documents"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')}: must be at least 1")
    for name in ("gpu_memory", "peak_tflops"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')}: must be positive")
    mfu = args.mfu or [0.4, 0.55]
    if not all(0 < value <= 1 for value in mfu):
        problems.append("--mfu: must be in (0, 1]")
    cfg, config_problems = config_io.load_collecting(TrainConfig, args.config, args.overrides)
    problems += config_problems
    gpus = args.gpus or (int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None)
    if cfg is not None and gpus is not None and gpus >= 1:
        problems += input_problems(cfg, gpus)  # again in `plan`, with the vision weights (cheap)
    config_io.raise_problems(problems)

    import torch

    from kosmos.train.metrics import PEAK_BF16_TFLOPS, peak_flops

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    gpus = gpus or max(1, torch.cuda.device_count())
    memory = args.gpu_memory
    if memory is None:
        memory = torch.cuda.get_device_properties(device).total_memory / GB if device.type == "cuda" else 80.0
    # The configured or known peak of these GPUs; an H100's (dense bf16, SXM) where nothing says.
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(cfg.logging, device, bf16=True)
    cluster = Cluster(
        gpus=gpus,
        gpus_per_node=min(args.gpus_per_node, gpus),
        gpu_memory_gb=memory,
        peak_tflops=peak / 1e12 if peak else dict(PEAK_BF16_TFLOPS)["H100"],
        mfu=mfu,
        attention=args.attention or training_backend(cfg),
    )
    report = plan(cfg, cluster, args.probe_documents)
    print(json.dumps(report) if args.json else format_plan(report))
    return 0
