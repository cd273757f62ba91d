"""The CUDA paths run on CPU: `kosmos bench gpu` end to end, process groups and devices per rank,
the optimizer state after a resize, the bookkeeping of a step without device syncs. Kernels are
replaced by the strict stand-ins of `standins`; what only a GPU can show is in `pytest -m gpu`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import standins
import torch

from kosmos.cli import main
from kosmos.train.config import LoggingConfig
from kosmos.train.metrics import peak_flops

TINY = ["model.text.layers=2", "model.vision.layers=1", "model.vision.trainable_blocks=1"]


@pytest.mark.parametrize(
    "name, tflops", [("NVIDIA H100 NVL", 835), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756)]
)
def test_spec_peak_of_each_h100_model(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert peak_flops(LoggingConfig(), torch.device("cuda"), bf16=True) == tflops * 1e12


def test_attention_times_cover_every_layer_of_a_step(tiny_config, monkeypatch):
    from kosmos.bench.gpu import time_backends

    standins.install(monkeypatch)
    times = time_backends(
        tiny_config, 128, torch.device("cpu"), ["documents", "varlen", "flash", "flex"], repeats=1
    )
    assert all(
        times[name]["ms"] > 0 and times[name]["layers"] == tiny_config.text.layers
        for name in ("sdpa", "varlen")
    )
    assert "flex trains only on CUDA" in times["flex"]["error"]


@pytest.mark.slow
def test_bench_gpu_runs_every_part_on_cpu_and_records_each_failure(tmp_path, monkeypatch, capsys):
    from kosmos.bench import gpu

    standins.install(monkeypatch)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu, "time_backends", out_of_memory)
    out = tmp_path / "gpu.json"
    command = ["bench", "gpu", "--device", "cpu", "--config", "configs/model/tiny.yaml", "--out", str(out)]
    assert main([*command, "--stages", "2", "--train-steps", "1", *TINY]) == 0
    report = json.loads(out.read_text())
    checks = report["attention_checks"]
    assert all(checks[name]["ok"] for name in ("documents", "varlen", "flash")), checks
    assert not checks["flex"]["ok"] and "flex trains only on CUDA" in checks["flex"]["error"]
    assert "out of memory" in report["attention_times"]["error"]  # recorded; the next parts ran
    train = report["train"]
    assert train["zero2"]["ours"]["tokens_per_s"] > 0 and train["zero2"]["mfu_peak"] == "measured"
    assert (
        train["zero2_packed"]["rows"] == "synthetic, packed"
        and train["zero2_packed"]["documents_per_row"] > 1
    )
    assert report["generate"]["ours"]["tokens_per_s"] > 0
    assert "written to" in capsys.readouterr().out


def test_xpos_frequencies_stay_fp32_in_a_bf16_model():
    from kosmos.model.kosmos import XPos

    xpos = XPos(head_dim=64, scale_base=512, centre=1024)
    x = torch.randn(1, 2, 300, 64).bfloat16()
    positions = torch.arange(0, 2100, 7).unsqueeze(0)
    expected = xpos(x, positions, is_key=True)
    xpos.bfloat16()  # what DeepSpeed's bf16 engine and a bf16 evaluation do to the module
    assert torch.equal(xpos(x, positions, is_key=True), expected)


def test_evaluation_joins_the_group_on_its_ranks_gpu(monkeypatch):
    """Rank 1 of two, faked CUDA: its GPU becomes current before NCCL starts (object collectives and
    tensors made on "cuda" follow the current device, else cuda:0 on every rank)."""
    import torch.distributed as dist

    from kosmos.eval.harness import init_distributed

    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    init_distributed()
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]


def test_a_resized_resume_puts_each_step_where_adamw_reads_it():
    """The fused kernel reads `step` on the parameter's device (here a meta device stands for the
    GPU); the other kernels on the CPU. DeepSpeed's universal loader leaves them all on the CPU."""
    from types import SimpleNamespace

    from kosmos.train.elastic import place_optimizer_steps

    fused, plain = (torch.nn.Parameter(torch.empty(3, device="meta")) for _ in range(2))
    state = {p: {"step": torch.tensor(7.0), "exp_avg": torch.empty(3, device="meta")} for p in (fused, plain)}
    groups = [{"params": [fused], "fused": True}, {"params": [plain], "fused": False, "capturable": False}]
    place_optimizer_steps(SimpleNamespace(param_groups=groups, state=state))
    assert state[fused]["step"].device.type == "meta" and state[plain]["step"].device.type == "cpu"


def test_a_training_step_never_reads_the_device(tiny_config, monkeypatch):
    """Its bookkeeping on a meta device, which has no values to read: any host sync (`.item()`,
    `int()`, a comparison on the host) would raise. On the CPU the same sums are the batch's counts."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from kosmos.bench.common import synthetic_packed_batch
    from kosmos.tokenizer import IGNORE_INDEX
    from kosmos.train.trainer import LABELLED, LOSS_SUM, TOKENS, Trainer

    batch = dataclasses.replace(synthetic_packed_batch(tiny_config, rows=2, seq_len=96), corpora=("caption", "text"))
    steps = []
    for device in ("meta", "cpu"):
        trainer = Trainer.__new__(Trainer)
        trainer.env = SimpleNamespace(device=torch.device(device), world_size=1)
        trainer.corpora, trainer.per_document_attention = ["text", "caption"], True
        trainer.cfg = SimpleNamespace(model=tiny_config)
        token_loss = torch.ones(2, 96, device=device, requires_grad=True)
        engine = type("Engine", (), {"__call__": lambda self, loss=token_loss, **b: SimpleNamespace(token_loss=loss)})
        trainer.engine = engine()
        trainer.engine.backward = lambda loss, scale_wrt_gas: steps.append(loss.shape)
        trainer.engine.step = lambda: None
        monkeypatch.setattr(dist, "all_reduce", lambda tensor: None)
        sums = trainer._train_step([batch])
    assert steps == [torch.Size([]), torch.Size([])]
    labelled = (batch.labels != IGNORE_INDEX).sum(1)
    assert sums[1, LABELLED] == labelled[0] and sums[0, LABELLED] == labelled[1]  # caption row, text row
    assert sums[:, LOSS_SUM].tolist() == [96.0, 96.0]
    assert sums[:, TOKENS].sum() == (batch.segment_ids > 0).sum()


def test_deterministic_mode_sets_what_a_repeatable_gpu_run_needs(monkeypatch):
    from kosmos.train.state import use_deterministic_algorithms

    calls = []
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: calls.append(mode))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    use_deterministic_algorithms()
    assert calls == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.benchmark is False


def test_a_batch_with_too_few_image_slots_stops_on_the_host(tiny_config):
    """Before it reaches a GPU, where the check is a device-side assertion that poisons the context."""
    from types import SimpleNamespace

    from kosmos.bench.common import synthetic_batch
    from kosmos.train.trainer import Trainer

    batch = synthetic_batch(tiny_config, rows=1, seq_len=64, images_per_row=1)
    bad = dataclasses.replace(batch, image_mask=batch.image_mask.clone().fill_(False), corpora=("caption",))
    trainer = Trainer.__new__(Trainer)
    trainer.env = SimpleNamespace(device=torch.device("meta"), world_size=1)
    trainer.cfg = SimpleNamespace(model=tiny_config)
    with pytest.raises(ValueError, match="1 images need 16 image slots, the batch has 0"):
        trainer._train_step([bad])


def test_a_world_of_one_joins_without_listening_on_a_port():
    """Without a launcher a process is a world of one on an in-process store. A TCP store needs a free
    port picked beforehand, which any other process may bind first (two runs starting together)."""
    script = """
import torch.distributed as dist
from kosmos.distributed import join_process_group
env = join_process_group()
store = dist.distributed_c10d._get_default_store()
store = getattr(store, "underlying_store", store)
print(env.rank, env.world_size, type(store).__name__)
"""
    launcher = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    environment = {key: value for key, value in os.environ.items() if key not in launcher}
    done = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "1", "HashStore"]
