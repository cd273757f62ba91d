"""`kosmos bench {train,generate,data,time-to-loss,gpu}`: benchmarks, run from a training or model config.

Each benchmark warms up, times a fixed amount of work, and prints a table (or one JSON object with
`--json`). Rates are per second of wall time on this machine; `--hf` puts `transformers`' Kosmos-2
(SDPA attention) with the same weights beside ours in the same run, alternating the two so that both
see the same machine load, and reports `speedup`: their time over ours.

- train: optimizer steps of the DeepSpeed engine the trainer builds (same ZeRO stage, precision,
  optimizer, activation checkpointing, `train.compile`), on synthetic batches of the configured
  shape: tokens/s, samples/s, step time, peak memory, and MFU with `flops_utilisation`, the formula
  of the training logs, its language and vision terms apart; the attention's time and share of a
  step; `--packed` rows of a real corpus, `--attention` backends side by side. `--memory` (CUDA
  only): per ZeRO stage, the largest micro-batch that fits with and without activation
  checkpointing, and how few layers need checkpointing at the configured micro-batch.
- generate: greedy decoding with a KV cache of `--new-tokens` tokens after a prompt of one image and
  some text (it never stops early); `--compile` runs the decoding steps of both sides compiled.
- data: the training loader (tokenizing, CLIP preprocessing, packing, its workers) against a bare
  loop that only reads the same shards and decodes and resizes their images, in the same run.
- time-to-loss: wall time to reach a training loss, ours on packed rows against transformers'
  Kosmos-2 on the same documents padded, from the same weights.
- gpu: one command that checks the CUDA attention backends and measures training per ZeRO stage and
  decoding on a GPU, within a time budget, into one JSON.

`--config` is a training YAML, or a model YAML, which runs inside a training config's defaults
(micro-batch 1, the model's context length). Overrides use the training config's keys either way
(`data.micro_batch_size=8`, `deepspeed.zero_stage=3`, `train.compile=true`, `model.text.layers=2`).
"""

from __future__ import annotations

import argparse

from kosmos.bench import data, generate, gpu, time_to_loss, train

BENCHMARKS = (train, generate, data, time_to_loss, gpu)


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="throughput benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    for benchmark in BENCHMARKS:
        benchmark.register(benches)
