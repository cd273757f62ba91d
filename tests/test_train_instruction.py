"""Instruction-tuning data: (instruction, input, output) triples learn their output and nothing else."""

from __future__ import annotations

import json

import torch

from kosmos.data import CorpusConfig, DataConfig, build_loader
from kosmos.data.build import build_instruction
from kosmos.tokenizer import EOS, IGNORE_INDEX


def test_only_the_output_is_learned(tmp_path, tokenizer):
    rows = [
        {"instruction": "Write the digit as a word.", "input": "7", "output": "seven"},
        {"instruction": "Name the colour of a clear sky.", "output": "blue"},
        {"instruction": "", "input": "nothing to do", "output": "x"},
        {"instruction": "Count to two.", "input": ["not", "text"], "output": "one two"},
    ]
    source = tmp_path / "triples.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n{broken\n")
    index = build_instruction([source], tmp_path / "instructions")
    assert index.num_samples == 2
    assert index.skipped == {"empty_text": 1, "invalid_json": 2}

    corpus = CorpusConfig(kind="instruction", path=str(tmp_path / "instructions"), tokens_per_step=128)
    loader = build_loader(
        DataConfig(corpora=[corpus], seq_len=128, micro_batch_size=1, num_workers=0), tokenizer, 32, 16
    )
    batch = next(iter(loader))[0]
    outputs = {tuple(tokenizer.encode(row["output"]) + [EOS]): row for row in rows[:2]}
    seen = set()
    for segment in batch.segment_ids[0].unique().tolist():
        if segment == 0:
            continue
        here = batch.segment_ids[0] == segment
        labels = batch.labels[0][here]
        learned = tuple(labels[labels != IGNORE_INDEX].tolist())
        assert learned in outputs  # the output and its closing </s>, nothing of the prompt
        row = outputs[learned]
        prompt = tokenizer.decode(batch.input_ids[0][here].tolist())
        assert row["instruction"] in prompt and row.get("input", "") in prompt
        seen.add(learned)
    assert len(seen) == 2
    assert batch.corpora == ("instruction",) and not torch.any(batch.image_mask)
