"""Strict stand-ins for the CUDA attention kernels, so that the code around them runs on CPU.

Each enforces what the real kernel requires of its arguments (and fails as loudly where it is not
met), then computes causal attention per sequence with SDPA in fp32. Their signatures are those
of the releases recorded in `SIGNATURES`, which the tests also check against the installed packages.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def check_kernel_arguments(q, k, v, cu_q, cu_k, max_q, max_k) -> None:
    for name, y in zip("qkv", (q, k, v)):
        if y.dim() != 3 or not y.is_contiguous():
            raise RuntimeError(
                f"{name} must be a contiguous (total, heads, head_dim) tensor, got {tuple(y.shape)}"
            )
        if y.dtype not in HALF:
            raise RuntimeError(f"{name}: the kernel supports only fp16 and bf16, got {y.dtype}")
        if y.shape[-1] > 256:
            raise RuntimeError(f"{name}: head_dim {y.shape[-1]} > 256")
        if y.device != q.device:
            raise RuntimeError(f"{name} is on {y.device}, q on {q.device}")
    if not (q.shape == k.shape == v.shape):
        raise RuntimeError(f"q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}")
    for cu in (cu_q, cu_k):
        if cu.dtype != torch.int32 or cu.device != q.device or cu.dim() != 1:
            raise RuntimeError(f"cu_seqlens must be 1-D int32 on {q.device}, got {cu.dtype} on {cu.device}")
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or bool((cu.diff() < 0).any()):
            raise RuntimeError(f"cu_seqlens must rise from 0 to {q.shape[0]}: {cu.tolist()}")
    for bound, cu in ((max_q, cu_q), (max_k, cu_k)):
        if type(bound) is not int:
            raise TypeError(f"max_seqlen must be an int, got {type(bound).__name__}")
        if bound < int(cu.diff().max()):
            raise RuntimeError(f"max_seqlen {bound} is below the longest sequence {int(cu.diff().max())}")


def causal_per_sequence(q, k, v, cu, dropout: float = 0.0) -> torch.Tensor:
    outputs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        picked = [y[start:end].transpose(0, 1).float() for y in (q, k, v)]  # (heads, length, dim)
        out = F.scaled_dot_product_attention(*picked, dropout_p=dropout, is_causal=True)
        outputs.append(out.transpose(0, 1).to(q.dtype))
    return torch.cat(outputs)


# torch 2.10: `is_causal`, positional or keyword.
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    check_kernel_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    if is_causal is not True:
        raise RuntimeError("stand-in: only causal attention is computed here")
    return causal_per_sequence(query, key, value, cu_seq_q)


# torch 2.11 and later: keyword-only options, `window_size` (left, right) instead of `is_causal`.
def varlen_attn_2_11(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    check_kernel_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    if tuple(window_size) != (-1, 0):
        raise RuntimeError("stand-in: only causal attention (window_size=(-1, 0)) is computed here")
    return causal_per_sequence(query, key, value, cu_seq_q)


# flash-attn 2.6 and later (2.5 is the same without `softcap`).
def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    check_kernel_arguments(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if causal is not True or not isinstance(dropout_p, float) or not isinstance(deterministic, bool):
        raise RuntimeError("stand-in: causal=True, a float dropout_p and a bool deterministic expected")
    flash_attn_varlen_func.calls.append({"deterministic": deterministic, "dropout_p": dropout_p})
    return causal_per_sequence(q, k, v, cu_seqlens_q, dropout_p)


flash_attn_varlen_func.calls = []


def install(monkeypatch, varlen=varlen_attn_2_11) -> None:
    """The stand-ins in place of the kernels, and the CUDA-only backends allowed on CPU."""
    from kosmos.model import attention

    monkeypatch.setattr(attention, "varlen_attn", varlen)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", flash_attn_varlen_func)
    backends = {
        name: dataclasses.replace(backend, cuda_only=False) for name, backend in attention.BACKENDS.items()
    }
    monkeypatch.setattr(attention, "BACKENDS", backends)
    flash_attn_varlen_func.calls.clear()
