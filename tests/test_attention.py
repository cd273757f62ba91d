"""Attention backends over packed rows give the dense-mask reference's logits and gradients, and
`model.attention: auto` picks as documented. Nothing here is timed."""

import dataclasses
import inspect

import pytest
import standins
import torch
import torch.nn.functional as F

from kosmos.bench.common import synthetic_batch, synthetic_packed_batch
from kosmos.bench.gpu import min_gradient_cosine
from kosmos.config import ConfigError
from kosmos.model import KosmosModel, load_model_config
from kosmos.model import attention as attention_module
from kosmos.model.attention import DocumentBuckets, choose_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _logits_and_grads(model, batch):
    model.zero_grad()
    inputs = dataclasses.replace(batch, labels=None).inputs()
    logits = model(**inputs).logits
    real = batch.segment_ids > 0
    loss = model(**batch.inputs()).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits[real].detach(), loss.detach(), grads


def _twin(model, backend):
    other = KosmosModel(dataclasses.replace(model.cfg, attention=backend))
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def test_packed_batch_has_many_documents_padding_and_images(tiny_config):
    batch = synthetic_packed_batch(tiny_config, rows=3, seq_len=200)
    segments = batch.segment_ids
    assert (segments.max(1).values >= 4).all()
    assert (segments == 0).any() and batch.image_mask.any()
    assert int(batch.image_mask.sum()) == len(batch.images) * tiny_config.connector.num_queries


def test_packed_batches_of_any_seed_hold_only_documents_that_can_be_made(tiny_config):
    for seed in range(12):  # short text documents were drawn 2 positions long in about a third of seeds
        batch = synthetic_packed_batch(tiny_config, rows=2, seq_len=160, seed=seed, spread=4)
        assert batch.input_ids.shape == (2, 160)


def test_documents_backend_trains_like_the_dense_mask(tiny_config):
    reference = KosmosModel(dataclasses.replace(tiny_config, attention="sdpa")).train()
    documents = _twin(reference, "documents")
    batch = synthetic_packed_batch(tiny_config, rows=3, seq_len=200)
    logits, loss, grads = _logits_and_grads(documents, batch)
    ref_logits, ref_loss, ref_grads = _logits_and_grads(reference, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_documents_backend_on_rows_of_one_document_each(tiny_config):
    reference = KosmosModel(dataclasses.replace(tiny_config, attention="sdpa")).eval()
    documents = _twin(reference, "documents")
    batch = synthetic_batch(tiny_config, rows=2, seq_len=64, images_per_row=1)
    assert DocumentBuckets(batch.segment_ids).whole_rows
    with torch.no_grad():
        torch.testing.assert_close(documents(**batch.inputs()).logits, reference(**batch.inputs()).logits, atol=1e-5, rtol=1e-4)


def test_documents_backend_trains_with_attention_dropout(tiny_config):
    text = dataclasses.replace(tiny_config.text, attention_dropout=0.5, layers=1)
    model = KosmosModel(dataclasses.replace(tiny_config, text=text, attention="documents")).train()
    batch = synthetic_packed_batch(model.cfg, rows=2, seq_len=120)
    losses = [model(**batch.inputs()).loss for _ in range(2)]
    losses[0].backward()
    assert torch.isfinite(losses[0]) and losses[0] != losses[1]  # a fresh dropout mask each forward
    with torch.no_grad():
        assert model.eval()(**batch.inputs()).loss == model(**batch.inputs()).loss  # none in evaluation


def test_document_buckets_group_similar_lengths():
    lengths = [300, 290, 250, 120, 100, 30, 5, 2]
    segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)]).unsqueeze(0)
    buckets = DocumentBuckets(F.pad(segments, (0, 10)))  # trailing padding: in no bucket
    shapes = [tuple(b.shape) for b in buckets.buckets]
    assert shapes == [(3, 300), (2, 120), (3, 30)]
    assert sorted(buckets.targets.tolist()) == list(range(sum(lengths)))  # every real position once


def test_flex_backend_forward_matches_the_dense_mask_on_cpu(tiny_config):
    cfg = dataclasses.replace(tiny_config, text=dataclasses.replace(tiny_config.text, layers=1))
    reference = KosmosModel(dataclasses.replace(cfg, attention="sdpa")).eval()
    flex = _twin(reference, "flex")
    batch = synthetic_packed_batch(cfg, rows=2, seq_len=160)
    inputs = dataclasses.replace(batch, labels=None).inputs()
    real = batch.segment_ids > 0
    with torch.no_grad():
        logits, ref_logits = flex(**inputs).logits[real], reference(**inputs).logits[real]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="model.attention: flex trains only on CUDA"):
        flex.train()(**batch.inputs())


def test_auto_picks_per_device_dtype_and_pass(monkeypatch):
    monkeypatch.setattr(attention_module, "varlen_attn", standins.varlen_attn_2_11)
    for needs_grad in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            assert choose_backend("auto", CPU, dtype, needs_grad, dropout=False) == "documents"
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", None)
    assert choose_backend("auto", CUDA, torch.bfloat16, True, dropout=False) == "varlen"
    assert choose_backend("auto", CUDA, torch.float32, True, dropout=False) == "flex"
    assert choose_backend("auto", CUDA, torch.bfloat16, True, dropout=True) == "documents"
    # Forward passes over ever new padded lengths: never the fixed-shape compiled flex.
    assert choose_backend("auto", CUDA, torch.float32, False, dropout=False) == "documents"
    assert choose_backend("auto", CUDA, torch.bfloat16, False, dropout=False) == "varlen"
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", standins.flash_attn_varlen_func)
    assert choose_backend("auto", CUDA, torch.bfloat16, True, dropout=True) == "flash"
    assert choose_backend("auto", CUDA, torch.float32, True, dropout=False) == "flex"


def test_auto_never_picks_a_backend_the_installed_torch_lacks(monkeypatch):
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention_module, "varlen_attn", None)  # torch before 2.10
    assert choose_backend("auto", CUDA, torch.bfloat16, True, dropout=False) == "flex"
    with pytest.raises(ConfigError, match=r"varlen needs torch>=2.10 .*this is torch"):
        choose_backend("varlen", CUDA, torch.bfloat16, True, dropout=False)
    monkeypatch.setattr(attention_module, "varlen_attn", lambda q, k, v, cu_q, cu_k, max_q, max_k: q)
    with pytest.raises(ConfigError, match="varlen needs torch>=2.10 .*another signature"):
        choose_backend("varlen", CUDA, torch.bfloat16, True, dropout=False)
    monkeypatch.setattr(attention_module, "flex_attention", None)  # torch before 2.5
    assert choose_backend("auto", CUDA, torch.bfloat16, True, dropout=False) == "documents"
    with pytest.raises(ConfigError, match="flex needs torch>=2.5"):
        choose_backend("flex", CUDA, torch.bfloat16, True, dropout=False)
    with pytest.raises(ConfigError, match=r"flash needs flash-attn>=2.5 installed"):
        choose_backend("flash", CUDA, torch.bfloat16, True, dropout=False)


def test_backends_that_cannot_run_are_refused_by_name(monkeypatch):
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention_module, "varlen_attn", standins.varlen_attn_2_11)
    refusals = [
        ("flash", CUDA, torch.bfloat16, False, "flash needs flash-attn"),
        ("varlen", CPU, torch.bfloat16, False, "varlen needs a CUDA device"),
        ("varlen", CUDA, torch.float32, False, "varlen needs fp16/bf16"),
        ("flex", CPU, torch.float32, False, "flex trains only on CUDA"),
        ("flex", CUDA, torch.float32, True, "flex has no attention dropout"),
    ]
    for choice, device, dtype, dropout, message in refusals:
        with pytest.raises(ConfigError, match=f"model.attention: {message}"):
            choose_backend(choice, device, dtype, needs_grad=True, dropout=dropout)
    assert choose_backend("flex", CPU, torch.float32, needs_grad=False, dropout=False) == "flex"
    assert choose_backend("sdpa", CUDA, torch.bfloat16, True, dropout=True) == "sdpa"


def test_deterministic_training_uses_only_deterministic_backwards(monkeypatch):
    monkeypatch.setattr(attention_module, "varlen_attn", standins.varlen_attn_2_11)
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", None)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert choose_backend("auto", CUDA, torch.bfloat16, True, dropout=False) == "documents"
    for name in ("varlen", "flex"):
        with pytest.raises(ConfigError, match=f"{name} has no deterministic backward"):
            choose_backend(name, CUDA, torch.bfloat16, True, dropout=False)
    assert choose_backend("auto", CUDA, torch.bfloat16, False, dropout=False) == "varlen"  # no backward
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", standins.flash_attn_varlen_func)
    assert choose_backend("auto", CUDA, torch.bfloat16, True, dropout=False) == "flash"
    assert attention_module.flash_arguments(standins.flash_attn_varlen_func)["deterministic"] is True


# The signatures of the kernels as the releases we support define them (the parameters we pass).
RECORDED_SIGNATURES = {
    ("torch", (2, 10)): standins.varlen_attn_2_10,
    ("torch", (2, 11)): standins.varlen_attn_2_11,
    ("flash-attn", (2, 6)): standins.flash_attn_varlen_func,
}


@pytest.mark.parametrize("release", list(RECORDED_SIGNATURES), ids=lambda r: f"{r[0]}-{r[1]}")
def test_kernel_calls_bind_to_each_supported_release(release):
    kernel = RECORDED_SIGNATURES[release]
    adapter = (
        attention_module.flash_arguments if release[0] == "flash-attn" else attention_module.varlen_causal_arguments
    )
    options = adapter(kernel)
    assert options is not None
    inspect.signature(kernel).bind(*"qkv", "cu", "cu", 8, 8, **options)  # how `Varlen` calls it


def test_installed_varlen_kernel_has_the_recorded_signature():
    from torch.nn.attention import varlen

    version = tuple(int(x) for x in torch.__version__.split(".")[:2])
    recorded = RECORDED_SIGNATURES[("torch", max(v for _, v in RECORDED_SIGNATURES if v <= version))]
    real = inspect.signature(varlen.varlen_attn).parameters
    for name, parameter in inspect.signature(recorded).parameters.items():
        assert name in real and real[name].kind == parameter.kind, name
        assert real[name].default == parameter.default, name
    assert attention_module.varlen_causal_arguments(varlen.varlen_attn) == attention_module.varlen_causal_arguments(
        recorded
    )


def test_installed_flex_has_what_the_backend_calls():
    from torch.nn.attention import flex_attention

    assert {"B", "H", "Q_LEN", "KV_LEN", "device"} <= inspect.signature(flex_attention.create_block_mask).parameters.keys()
    assert "block_mask" in inspect.signature(flex_attention.flex_attention).parameters


@pytest.mark.parametrize("varlen", [standins.varlen_attn_2_10, standins.varlen_attn_2_11])
@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_varlen_kernels_called_as_they_require_train_like_the_dense_mask(
    tiny_config, monkeypatch, backend, varlen
):
    standins.install(monkeypatch, varlen)
    cfg = dataclasses.replace(tiny_config, text=dataclasses.replace(tiny_config.text, layers=1, attention_dropout=0.0))
    reference = KosmosModel(dataclasses.replace(cfg, attention="sdpa")).bfloat16().train()
    other = _twin(reference, backend).bfloat16()
    batch = synthetic_packed_batch(cfg, rows=2, seq_len=128)
    batch.images = batch.images.bfloat16()
    logits, _, grads = _logits_and_grads(other, batch)
    ref_logits, _, ref_grads = _logits_and_grads(reference, batch)
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=5e-2, rtol=5e-2)
    assert min_gradient_cosine(grads, ref_grads) > 0.99
    if backend == "flash":
        assert standins.flash_attn_varlen_func.calls and not standins.flash_attn_varlen_func.calls[0]["deterministic"]


def test_kernel_standins_refuse_what_the_kernels_refuse():
    q = torch.randn(10, 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    standins.varlen_attn_2_11(q, q, q, cu, cu, 10, 10, window_size=(-1, 0))
    bad = [
        ((q.float(), q, q, cu, cu, 10, 10), "fp16 and bf16"),
        ((q, q, q, cu.long(), cu.long(), 10, 10), "int32"),
        ((q, q, q, cu, cu, torch.tensor(10), 10), "must be an int"),
        ((q.transpose(0, 1).contiguous().transpose(0, 1), q, q, cu, cu, 10, 10), "contiguous"),
        ((torch.randn(10, 1, 264, dtype=torch.bfloat16),) * 3 + (cu, cu, 10, 10), "head_dim"),
        ((q, q, q, cu, cu, 5, 10), "below the longest"),
    ]
    for arguments, message in bad:
        with pytest.raises((RuntimeError, TypeError), match=message):
            standins.varlen_attn_2_11(*arguments, window_size=(-1, 0))


def test_flex_block_mask_is_built_on_the_segments_device(monkeypatch):
    seen = []
    monkeypatch.setattr(attention_module, "create_block_mask", lambda *a, device: seen.append(device))
    segments = torch.ones(2, 16, dtype=torch.long, device="meta")
    attention_module.FlexBlocks(segments)
    # The tensor's device itself (on a GPU rank: cuda:LOCAL_RANK), not its type ("cuda" is cuda:0).
    assert seen == [segments.device] and isinstance(seen[0], torch.device)


def test_attention_choices_are_the_backends_and_auto():
    assert set(attention_module.CHOICES) == {"auto", *attention_module.BACKENDS}


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="attention"):
        load_model_config("configs/model/tiny.yaml", ["attention=dense"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["documents", "flex", "varlen", "flash"])
def test_cuda_backends_train_like_the_dense_mask_in_bf16(tiny_config, backend):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    reference = KosmosModel(dataclasses.replace(tiny_config, attention="sdpa")).cuda().bfloat16().train()
    other = _twin(reference, backend).cuda().bfloat16()
    batch = synthetic_packed_batch(tiny_config, rows=3, seq_len=256).to(CUDA)
    batch.images = batch.images.bfloat16()
    logits, loss, grads = _logits_and_grads(other, batch)
    ref_logits, ref_loss, ref_grads = _logits_and_grads(reference, batch)
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=3e-2, rtol=3e-2)
    assert min_gradient_cosine(grads, ref_grads) > 0.99  # bf16 kernels differ elementwise: directions


def test_padded_documents_give_the_packed_loss(tiny_config):
    """What `kosmos bench time-to-loss` feeds transformers' Kosmos-2: the packed pieces, one per
    row, padded in micro-batches of a position budget; same loss summed over the labelled tokens."""
    pytest.importorskip("transformers")
    from kosmos.bench.common import transformers_twin
    from kosmos.bench.time_to_loss import padded_batches, split_documents, theirs_micro_step

    model = KosmosModel(tiny_config).train()
    twin = transformers_twin(model).train()
    batch = synthetic_packed_batch(tiny_config, rows=3, seq_len=200)
    documents = split_documents(batch, tiny_config.connector.num_queries)
    padded = padded_batches(documents, budget=300)
    assert len(padded) > 1 and all(b["input_ids"].numel() <= 300 for b in padded)
    assert sum(len(b["input_ids"]) for b in padded) == int(batch.segment_ids.max(1).values.sum())
    theirs = sum(theirs_micro_step(twin, b) for b in padded)
    torch.testing.assert_close(theirs, model(**batch.inputs()).token_loss.sum(), atol=1e-3, rtol=1e-5)


def test_gpu_benchmark_checks_backends_and_skips_without_cuda(tiny_config, capsys):
    from kosmos.bench.gpu import check_backends
    from kosmos.cli import main

    results = check_backends(tiny_config, CPU, torch.float32, ["documents", "flex"])
    assert results["documents"]["ok"] and results["documents"]["min_gradient_cosine"] > 0.999
    assert not results["flex"]["ok"] and "flex trains only on CUDA" in results["flex"]["error"]
    if not torch.cuda.is_available():
        assert main(["bench", "gpu", "--out", "unused.json"]) == 0
        assert "skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_benchmark_runs_its_parts_as_bench_commands():
    import argparse
    import time

    from kosmos.bench.gpu import _subcommand

    small = ["model.text.layers=1", "model.vision.layers=1", "model.vision.trainable_blocks=1"]
    args = argparse.Namespace(config="configs/model/tiny.yaml", overrides=small, device="cpu")
    command = ["generate", "--steps", "1", "--warmup", "1", "--new-tokens", "4"]
    report = _subcommand(args, command, time.monotonic() + 300, "model.text.heads=2")
    assert report["benchmark"] == "generate" and report["ours"]["tokens_per_s"] > 0
    assert _subcommand(args, command, time.monotonic() + 10) == {"skipped": "out of time budget"}
    failed = _subcommand(args, command, time.monotonic() + 300, "model.text.heads=3")
    assert "model.text.heads" in failed["error"]


def test_gradient_check_ignores_key_biases_whose_gradient_is_rounding_noise(tiny_config):
    """In bf16 a key bias's gradient (zero in exact arithmetic) points anywhere: a correct backend
    must not fail the check on it."""
    reference = KosmosModel(dataclasses.replace(tiny_config, attention="sdpa")).bfloat16().train()
    batch = synthetic_packed_batch(tiny_config, rows=2, seq_len=96)
    batch.images = batch.images.bfloat16()
    _, _, grads = _logits_and_grads(reference, batch)
    noisy = dict(grads)
    for name in [n for n in grads if n.endswith("k_proj.bias")]:
        noisy[name] = torch.randn_like(grads[name]) * grads[name].float().norm()  # as large, any direction
    assert min_gradient_cosine(noisy, grads) > 0.999
