"""`kosmos bench generate`: greedy decoding with a KV cache, or beam search (`--beams`), ours and
optionally transformers' Kosmos-2 alternated; `--compile` compiles the decoding steps of both sides alike."""

from __future__ import annotations

import argparse
import statistics

from kosmos.bench.common import (
    add_common_arguments,
    alternate,
    load_bench_config,
    machine,
    memory_gb,
    print_report,
    synthetic_batch,
    transformers_inputs,
    transformers_twin,
)
from kosmos.cli import positive_int
from kosmos.threads import configure_threads

NEVER = -1  # an end-of-sequence id no token has: benchmarked generations run their full length


def register(benches: argparse._SubParsersAction) -> None:
    generate = benches.add_parser("generate", help="greedy decoding or beam search with a KV cache")
    add_common_arguments(generate, steps=5, warmup=1)
    generate.add_argument("--batch", type=positive_int, default=1, help="prompts decoded together (default 1)")
    generate.add_argument("--prompt-tokens", type=positive_int, default=16, help="text tokens after the image")
    generate.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated (default 64)")
    generate.add_argument(
        "--beams",
        type=positive_int,
        help="beam search with this many beams, stopping at </s> as evaluation does (captioning: 5 beams, "
        "30 new tokens); without it, greedy decoding of exactly --new-tokens",
    )
    generate.add_argument(
        "--compile",
        action="store_true",
        help="decoding steps through torch.compile, both sides alike (compiled in the warm-up)",
    )
    generate.set_defaults(handler=bench_generate)


def bench_generate(args: argparse.Namespace) -> int:
    import torch

    from kosmos.model import KosmosModel, generate
    from kosmos.model.kosmos import compile_for_decoding
    from kosmos.tokenizer import EOS, PAD, Encoded
    from kosmos.train.engine import use_bf16

    cfg = load_bench_config(args.config, args.overrides)
    configure_threads(setting=cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if use_bf16(cfg.deepspeed.bf16) else torch.float32
    length = args.prompt_tokens + cfg.model.connector.num_queries + 4  # <s> <image> </image> </s>
    batch = synthetic_batch(cfg.model, args.batch, length, 1)
    prompts = [
        Encoded(ids[:-1], mask[:-1], [True] * (length - 1), 1)  # without </s>: a prompt to continue
        for ids, mask in zip(batch.input_ids.tolist(), batch.image_mask.tolist())
    ]
    images = batch.images.to(device, dtype)

    torch.manual_seed(cfg.train.seed)
    model = KosmosModel(cfg.model).eval()
    # Greedy decodes its full length; beams stop at </s> and by transformers' rule (early_stopping=False).
    decoding = {"strategy": "beam", "num_beams": args.beams, "eos_id": EOS} if args.beams else {"eos_id": NEVER}
    runs = {
        "ours": lambda: generate(
            model, prompts, images, max_new_tokens=args.new_tokens, compile=args.compile, **decoding
        )
    }
    if args.hf:
        from kosmos.model import pad_batch

        twin = transformers_twin(model).to(device, dtype).eval()
        twin.generation_config.eos_token_id = EOS if args.beams else None
        twin.generation_config.pad_token_id = PAD
        search = {"num_beams": args.beams or 1}
        if args.beams:
            search.update(length_penalty=1.0, early_stopping=False)
        if args.compile:  # Kosmos-2's generate runs its text model, compiled here as ours is
            twin.text_model.forward = compile_for_decoding(twin.text_model.forward, device.type)
        inputs = transformers_inputs(pad_batch(prompts, "left", device, images))

        def theirs() -> list[list[int]]:
            out = twin.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, **search)
            rows = out[:, inputs["input_ids"].shape[1] :].tolist()
            return [row[: row.index(EOS)] if args.beams and EOS in row else row for row in rows]

        runs["theirs"] = theirs
    model.to(device, dtype)

    outputs = {}
    for side, run in runs.items():
        for _ in range(max(1, args.warmup)):  # at least one: its tokens are compared
            outputs[side] = run()
    seconds = alternate(runs, args.steps, device)

    tokens = args.batch * args.new_tokens
    report = {
        "benchmark": "generate",
        "config": str(args.config),
        "machine": machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "prompt_length": length - 1,
        "new_tokens": args.new_tokens,
        "beams": args.beams,
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
    report["ours"]["peak_memory_gb"] = memory_gb(device)
    if args.hf:
        report["same_tokens"] = outputs["ours"] == outputs["theirs"]
        report["speedup"] = round(report["theirs"]["call_s"] / report["ours"]["call_s"], 3)
    print_report(report, args.json, ["call_s", "ms_per_token", "tokens_per_s", "samples_per_s"])
    return 0
