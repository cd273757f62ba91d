"""What the benchmarks share: their configuration, synthetic batches, transformers' Kosmos-2 twin,
timing that alternates the sides of a comparison, and the printed report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kosmos.cli import non_negative_int, positive_int
from kosmos.threads import available_cores

if TYPE_CHECKING:
    from kosmos.data.batch import Batch


def add_common_arguments(parser, steps: int, warmup: int) -> None:
    parser.add_argument("--config", required=True, help="training YAML or model YAML")
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"timed repetitions (default {steps})")
    parser.add_argument("--warmup", type=non_negative_int, default=warmup, help=f"untimed ones first (default {warmup})")
    parser.add_argument("--hf", action="store_true", help="also time transformers' Kosmos-2, alternating")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides")


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


def synthetic_batch(model_cfg, rows: int, seq_len: int, images_per_row: int, seed: int = 0) -> Batch:
    """A batch of the batch contract (docs/design.md): one document per row filling it,
    `<s> text (<image> slots </image> text)* </s>` with random token ids and images."""
    import torch

    from kosmos.config import ConfigError
    from kosmos.data.batch import Batch
    from kosmos.tokenizer import BOS, EOS, FIRST_IMAGE_SLOT_ID, Encoded, special_ids

    queries = model_cfg.connector.num_queries
    special = special_ids(model_cfg.text.vocab_size)
    boi, eoi, first_special = special["<image>"], special["</image>"], min(special.values())
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
    return Batch(
        input_ids=torch.tensor([e.ids for e in encoded]),
        image_mask=torch.tensor([e.image_mask for e in encoded]),
        position_ids=torch.arange(seq_len).expand(rows, -1).contiguous(),
        segment_ids=torch.ones(rows, seq_len, dtype=torch.long),
        images=torch.randn(rows * images_per_row, 3, size, size, generator=generator),
        labels=torch.tensor([e.labels() for e in encoded]),
    )


def synthetic_packed_batch(cfg, rows: int, seq_len: int, seed: int = 0, spread: int = 40) -> Batch:
    """Rows packed with documents of random lengths (half with one image, each `spread` lengths
    above the shortest possible), then padding (little in the first row), as the data pipeline packs
    them; random token ids and images."""
    import torch

    from kosmos.data.batch import Batch
    from kosmos.tokenizer import IGNORE_INDEX, PAD

    generator = torch.Generator().manual_seed(seed)
    slots = cfg.connector.num_queries + 2
    parts = {key: [] for key in ("input_ids", "image_mask", "labels", "position_ids", "segment_ids")}
    images = []
    for row in range(rows):
        pieces, used, number = [], 0, 1
        padding = int(torch.randint(0, seq_len // 4, (), generator=generator)) if row else 0
        while used < seq_len - padding:
            with_image = bool(torch.randint(0, 2, (), generator=generator))
            # The shortest documents `synthetic_batch` makes: `<s>`, a token of text (and an image), `</s>`.
            low = slots + 4 if with_image else 3
            length = min(
                int(torch.randint(low, low + spread, (), generator=generator)), seq_len - padding - used
            )
            if length < low:  # too short for its image: the rest of the row is padding
                break
            doc_seed = int(torch.randint(2**31, (), generator=generator))
            doc = synthetic_batch(cfg, 1, length, int(with_image), seed=doc_seed)
            doc.labels[0, -1] = IGNORE_INDEX  # a document's last token predicts nothing in a row
            doc.segment_ids *= number
            pieces.append(doc)
            images.append(doc.images)
            used, number = used + length, number + 1
        for key, column in parts.items():
            row_parts = [getattr(doc, key)[0] for doc in pieces]
            fill = {"input_ids": PAD, "labels": IGNORE_INDEX}.get(key, 0)
            row_parts.append(torch.full((seq_len - used,), fill, dtype=row_parts[0].dtype))
            column.append(torch.cat(row_parts))
    return Batch(**{key: torch.stack(value) for key, value in parts.items()}, images=torch.cat(images))


def packed_rows(cfg, corpus: str) -> Batch:
    """One micro-batch of the config's shape, its rows packed by the data loader from the documents
    of the config's corpus named `corpus` (docs/design.md; several documents per row)."""
    import dataclasses

    from kosmos.config import ConfigError
    from kosmos.data import build_loader
    from kosmos.tokenizer import Tokenizer

    found = [c for c in cfg.data.corpora if c.name == corpus]
    if not found:
        names = ", ".join(c.name for c in cfg.data.corpora)
        raise ConfigError(f"--packed: the config has no corpus named {corpus!r} (it has {names})")
    rows, seq_len = cfg.data.micro_batch_size, cfg.data.seq_len
    only = dataclasses.replace(found[0], tokens_per_step=rows * seq_len)
    data = dataclasses.replace(cfg.data, corpora=[only], num_workers=0)
    loader = build_loader(
        data, Tokenizer(cfg.tokenizer), cfg.model.vision.image_size, cfg.model.connector.num_queries
    )
    (batch,) = next(iter(loader))
    return batch


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


def transformers_inputs(batch: Batch) -> dict:
    """Our `Batch` as Kosmos-2 arguments (one document per row; its labels are not yet shifted)."""
    import torch

    from kosmos.tokenizer import IGNORE_INDEX

    labels = batch.labels
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": (batch.segment_ids > 0).long(),
        "image_embeds_position_mask": batch.image_mask.long(),
        "pixel_values": batch.images,
    }
    if labels is not None:
        inputs["labels"] = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], 1)
    return inputs


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_peak_flops(device, dtype) -> float:
    """FLOP/s of large square matmuls in `dtype`: the peak this device reaches right now."""
    import torch

    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    seconds = [timed(lambda: a @ b, device) for _ in range(20 if device.type == "cuda" else 5)]
    return 2 * n**3 / statistics.median(seconds)


def memory_gb(device) -> float:
    from kosmos.train.metrics import peak_memory_gb

    return round(peak_memory_gb(device), 3)


def machine(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {available_cores()} cores, {threads} threads, load {load_average()}"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def alternate(runs: dict, repeats: int, device) -> dict[str, list[float]]:
    """Seconds of each run, interleaved so that every run sees the same load on a shared machine."""
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run, device))
    return seconds


def print_report(report: dict, as_json: bool, columns: list[str], sides: list[str] | None = None) -> None:
    """One JSON object, or the report's settings then a table of `sides` (default ours, theirs)."""
    if as_json:
        print(json.dumps(report))
        return
    sides = [side for side in (sides or []) + ["ours", "theirs"] if side in report]
    sides = list(dict.fromkeys(sides))
    for key, value in report.items():
        if key not in sides and key != "speedup":
            print(f"{key}: {value}")
    print(f"{'':>8} " + " ".join(f"{c:>15}" for c in columns))
    for side in sides:
        print(f"{side:>8} " + " ".join(f"{cell(report[side].get(c)):>15}" for c in columns))
    if "speedup" in report:
        print(f"speedup (theirs / ours time): {report['speedup']:.2f}x")


def cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)

