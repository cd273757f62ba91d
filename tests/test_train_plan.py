"""`kosmos train --dry-run`: the paper config checked against stand-in inputs, and the numbers of its plan."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clone_configs
from safetensors.torch import save_file

from kosmos.cli import main
from kosmos.config import ConfigError, apply_overrides
from kosmos.data.sample import build_sample
from kosmos.data.shards import CorpusWriter
from kosmos.model import KosmosModel, load_model_config, parameter_counts
from kosmos.model.memory import activation_memory
from kosmos.model.vision import VisionEncoder
from kosmos.train.config import load_train_config
from kosmos.train.plan import Cluster, format_plan, model_state_bytes, parameter_layout

REPO = Path(__file__).resolve().parents[1]
PAPER = "configs/train/kosmos1.yaml"  # in the stand-ins' folder, a clone's configs/


def _random_tower(cfg, path: Path) -> None:
    """A randomly initialised CLIP tower of `cfg`'s shapes, as a safetensors file (bf16)."""
    with torch.device("meta"):
        shapes = VisionEncoder(cfg).tower.state_dict()
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=generator).to(torch.bfloat16) for k, v in shapes.items()}
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """What configs/train/kosmos1.yaml names, in a working folder: the sample corpus's corpora, a
    64,000-piece tokenizer (trained on the sample corpus, filled up with placeholder pieces), and a
    random ViT-L/14 tower; also a random tower of the tiny model, of the wrong size."""
    root = tmp_path_factory.mktemp("paper")
    clone_configs(root)
    build_sample(root / "sample")
    (root / "corpora").mkdir()
    for kind in ("text", "caption", "interleaved"):
        (root / "corpora" / kind).symlink_to(root / "sample" / kind)
    tokenizer = root / "tokenizers/sentencepiece.model"  # as docs/training.md makes it from the sample
    command = ["tokenizer", "train", "--corpus", str(root / "sample"), "--vocab-size", "64000", "--placeholders"]
    assert main([*command, "--out", str(tokenizer)]) == 0
    # A caption corpus none of whose images decode: its index is fine, its samples are not.
    with CorpusWriter(root / "corpora/unreadable", "caption", samples_per_shard=20) as writer:
        for i in range(40):
            writer.write({"jpg": b"not an image", "txt": f"caption {i}".encode()})
    _random_tower(load_model_config(REPO / "configs/model/kosmos1.yaml").vision, root / "clip.safetensors")
    _random_tower(load_model_config(REPO / "configs/model/tiny.yaml").vision, root / "tiny_clip.safetensors")
    return root


def test_paper_config_plans_without_allocating_the_model(stand_ins):
    command = [str(stand_ins / PAPER), "--dry-run", "--gpus", "8", "--json", "--mfu", "0.4", "--mfu", "0.55"]
    script = (
        "import resource, sys\n"
        "from kosmos.cli import main\n"
        f"code = main(['train', '--config', *{command!r}, 'model.vision.weights=clip.safetensors'])\n"
        "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=stand_ins, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)  # stdout holds the plan alone

    cfg = load_train_config(stand_ins / PAPER)
    counts = parameter_counts(cfg.model)
    params = report["parameters"]
    assert (params["total"], params["trainable"]) == (counts["total"], counts["trainable"])
    # Never built with weights: the process peaked below the size of the weights in bf16.
    peak_rss = int(run.stderr.split("peak_rss_kib")[-1].split()[0]) * 1024
    assert peak_rss < 2 * counts["total"]

    checks = report["checks"]
    assert checks["tokenizer"]["vocab_size"] == cfg.model.text.vocab_size
    assert checks["vision_weights"]["tensors"] > 100
    assert all(probe["documents_read"] == 16 for probe in checks["corpora"].values())
    assert checks["corpora"]["caption"]["images"] == 16 and checks["corpora"]["text"]["images"] == 0

    step = report["step"]
    rows = {c.name: c.tokens_per_step // (cfg.data.seq_len * 8) for c in cfg.data.corpora}
    assert step["rows_per_rank"] == rows
    assert step["gradient_accumulation"] * cfg.data.micro_batch_size == sum(rows.values())
    assert step["tokens_per_rank"] * 8 == step["tokens"] == sum(c.tokens_per_step for c in cfg.data.corpora)

    table = {(r["zero_stage"], r["offload"], r["activation_checkpointing"]): r for r in report["memory_per_gpu"]}
    assert len(table) == 10
    for stage, offload in ((1, False), (2, False), (2, True), (3, False), (3, True)):
        plain, checkpointed = table[stage, offload, False], table[stage, offload, True]
        assert checkpointed["activations_gb"] < plain["activations_gb"]
        assert checkpointed["largest_micro_batch"] >= plain["largest_micro_batch"]
    # The paper config's own setting fits 80 GB GPUs (it does not pay for checkpointing it does not need),
    # DeepSpeed's two 16-bit gradient buckets of 5e8 elements counted.
    ds = cfg.deepspeed
    assert table[ds.zero_stage, ds.offload, bool(ds.activation_checkpointing)]["fits"]
    assert table[2, False, False]["communication_buffers_gb"] == pytest.approx(2 * 2 * 5e8 / 2**30, abs=0.01)
    # ZeRO divides the model states: each stage (and offloading) needs less than the one before.
    states = [table[key]["model_states_gb"] for key in ((1, False, False), (2, False, False), (3, False, False))]
    assert states == sorted(states, reverse=True)

    days = {at["mfu"]: at["days"] for at in report["time"]["at_mfu"]}
    assert days[0.4] == pytest.approx(days[0.55] * 0.55 / 0.4, rel=0.01)
    flops = report["flops_per_step"]
    assert flops["vision"] > 0 and flops["language"] > 0

    text = format_plan(report)
    assert f"gradient accumulation {step['gradient_accumulation']}" in text
    assert f"{params['total']:,} total" in text and "at MFU 55%" in text


@pytest.mark.parametrize(
    ("overrides", "gpus", "named"),
    [
        (["data.corpora.1.path=corpora/missing"], 8, r"data.corpora\[1\].path: \S+/corpora/missing does not exist"),
        (
            ["data.corpora.1.path=corpora/unreadable"],
            8,
            r"data.corpora\[1\].path: corpus caption \(\S+/corpora/unreadable\) can no longer feed its share",
        ),
        (["tokenizer=nowhere.model"], 8, r"tokenizer: \S+/nowhere.model does not exist"),
        (["model.text.vocab_size=64008"], 8, "model.text.vocab_size: 64008 does not match"),
        (
            ["model.vision.weights=tiny_clip.safetensors"],
            8,
            r"model.vision.weights: vision weights \S+/tiny_clip.safetensors lack 264 tower tensors",
        ),
        (
            ["model.vision.weights=tiny_clip.safetensors", "model.vision.layers=2"],
            8,
            r"model.vision.weights: vision weights \S+/tiny_clip.safetensors: class_embedding has shape \(64,\)",
        ),
        (
            ["model.vision.weights=nowhere.pt"],
            8,
            r"model.vision.weights: vision weights \S+/nowhere.pt do not exist",
        ),
        ([], 64, r"data.corpora\[0\].tokens_per_step: 491520 is not a multiple"),
        (["data.micro_batch_size=5"], 8, "data.micro_batch_size"),
    ],
)
def test_broken_configs_exit_2_naming_the_problem(stand_ins, monkeypatch, capsys, overrides, gpus, named):
    monkeypatch.chdir(stand_ins)
    args = ["train", "--config", PAPER, "--dry-run", "--gpus", str(gpus), *overrides]
    assert main(args) == 2
    assert re.search(named, capsys.readouterr().err)


def test_model_states_are_deepspeeds_estimates():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_model_config(REPO / "configs/model/tiny.yaml")
    model = KosmosModel(cfg)
    layout = parameter_layout(cfg)
    # The count DeepSpeed makes of a real model: the tied embedding once, the largest module.
    assert (layout["total"], layout["largest_module"]) == model_to_params(model)
    everything = {**layout, "trainable": layout["total"], "frozen": 0}
    cluster = Cluster(gpus=16, gpus_per_node=8, gpu_memory_gb=80, peak_tflops=989, mfu=[0.5], attention="flash")
    total, largest = model_to_params(model)
    for offload in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(total, 8, 2, cpu_offload=offload)
        assert model_state_bytes(everything, 2, offload, cluster)["gpu"] == gpu
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, 2, offload, offload)
        assert model_state_bytes(everything, 3, offload, cluster)["gpu"] == gpu
    # Stage 1: stage 2 with the 16-bit gradients whole on every GPU.
    stage2 = model_state_bytes(everything, 2, False, cluster)["gpu"]
    assert model_state_bytes(everything, 1, False, cluster)["gpu"] - stage2 == pytest.approx(2 * total * 15 / 16, abs=2)
    # Frozen parameters: bf16 weights, on every GPU below stage 3.
    frozen = {**everything, "trainable": total - 1000, "frozen": 1000}
    _, gpu = estimate_zero2_model_states_mem_needs(total - 1000, 8, 2, cpu_offload=False)
    assert model_state_bytes(frozen, 2, False, cluster)["gpu"] == gpu + 2000


@pytest.mark.parametrize(
    ("text", "rows", "seq_len", "images", "checkpointed"),
    [
        ({}, 2, 128, 1, 0),
        ({"dropout": 0.1, "attention_dropout": 0.1}, 2, 128, 2, 0),
        ({"layers": 3, "width": 64, "ffn_width": 320, "heads": 2}, 3, 96, 0, 0),
        ({"dropout": 0.1, "attention_dropout": 0.1}, 2, 128, 1, 3),
    ],
)
def test_activation_formula_counts_what_autograd_keeps(text, rows, seq_len, images, checkpointed):
    """The formula's kept bytes against the tensors autograd saves for the backward pass (CPU, fp32)."""
    from kosmos.bench.common import synthetic_batch

    overrides = [f"text.{k}={v}" for k, v in text.items()] + [f"text.max_positions={seq_len}"]
    # The formula knows the dense-mask kernels (and flash-attn's, on a GPU), not the CPU's per-document one.
    cfg = load_model_config(REPO / "configs/model/tiny.yaml", [*overrides, "attention=sdpa"])
    model = KosmosModel(cfg).train()
    model.gradient_checkpointing = checkpointed
    batch = synthetic_batch(cfg, rows, seq_len, images)
    storages = {}

    def keep(tensor):
        storages.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(**batch.inputs())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(size for pointer, size in storages.items() if pointer not in weights)
    labelled = int((batch.labels != -100).sum())
    # On a CPU, attention dropout runs in PyTorch's unfused math kernel; the fused one otherwise.
    fused = cfg.text.attention_dropout == 0
    formula = activation_memory(cfg, rows, seq_len, rows * images, labelled, 4, "sdpa", 4, checkpointed, fused)
    assert formula["kept"] == pytest.approx(saved, rel=0.002)
    assert formula["peak"] > formula["kept"]


def test_overrides_reach_into_lists():
    data = {"data": {"corpora": [{"path": "a"}, {"path": "b"}]}}
    apply_overrides(data, ["data.corpora.1.path=c", "data.corpora.0.max_images=3"])
    assert data["data"]["corpora"] == [{"path": "a", "max_images": 3}, {"path": "c"}]
    with pytest.raises(ConfigError, match="data.corpora.2: the list has items 0 to 1"):
        apply_overrides(data, ["data.corpora.2.path=d"])
