"""Attention over packed rows: documents side by side in a row never see each other.

A backend is chosen by `model.attention` and prepared once per forward from the batch's `segment_ids`
(0 = padding); every decoder layer then calls the same prepared attention on its q, k, v
([B, heads, T, head_dim]). Backends:

- `sdpa`: PyTorch SDPA with a dense [T, T] document mask. Costs the whole T x T of every row; the
  reference the others are checked against.
- `documents`: the row's documents gathered into buckets of similar length, each bucket one causal
  SDPA call, the outputs scattered back. Only the documents' own causal triangles (and a little
  padding to the bucket's length) are computed, with stock kernels that train on any device.
- `flex`: FlexAttention with a block mask of the segments, so blocks that are wholly masked are
  skipped. Trains on CUDA; on CPU PyTorch has its forward only.
- `varlen`: PyTorch's variable-length flash kernel (`torch.nn.attention.varlen`): CUDA, fp16/bf16.
- `flash`: flash-attn's variable-length kernel, when flash-attn is installed: CUDA, fp16/bf16.

`varlen` and `flex` have no attention dropout: they are refused where dropout would apply.
`auto` picks, for the device, dtype and pass at hand (see `choose_backend`):
- CUDA: `flash` if installed (half precision); else, unless dropout applies, `varlen` (half
  precision) or `flex`; else `documents`.
- CPU and other devices: `documents` (the fastest measured on CPU for training and for forward
  passes alike; docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kosmos.config import ConfigError

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

BACKENDS = ("auto", "sdpa", "documents", "flex", "varlen", "flash")


def attends_per_document(backend: str) -> bool:
    """Whether `backend` computes attention within each packed document only (FLOP accounting): all but
    the dense mask, which computes every query-key pair of the row and masks most of them."""
    return backend != "sdpa"

HALF = (torch.float16, torch.bfloat16)

# A bucket holds documents at least this fraction of its longest one's length (or within
# `BUCKET_SLACK` positions of it): each document pays at most 1/0.75^2 = 1.8x its own triangle,
# and short documents share a few buckets instead of one per length.
BUCKET_FILL = 0.75
BUCKET_SLACK = 64


def choose_backend(
    choice: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, dropout: bool
) -> str:
    """The backend `choice` ("auto" or a name) resolves to; raises ConfigError where it cannot run."""
    cuda, half = device.type == "cuda", dtype in HALF
    if choice == "auto":
        if cuda and half and flash_attn_varlen_func is not None:
            return "flash"
        if cuda and not dropout:
            return "varlen" if half and varlen_attn is not None else "flex"
        return "documents"
    if choice == "flash" and (flash_attn_varlen_func is None or not cuda or not half):
        raise ConfigError("model.attention: flash needs flash-attn installed, a CUDA device and fp16/bf16")
    if choice == "varlen" and (varlen_attn is None or not cuda or not half):
        raise ConfigError(
            "model.attention: varlen needs PyTorch's varlen kernel, a CUDA device and fp16/bf16"
        )
    if choice == "flex" and needs_grad and not cuda:
        raise ConfigError(
            "model.attention: flex trains only on CUDA (PyTorch has no FlexAttention backward on CPU)"
        )
    if choice in ("flex", "varlen") and dropout:
        raise ConfigError(
            f"model.attention: {choice} has no attention dropout; set model.text.attention_dropout=0 "
            "or choose sdpa, documents or flash"
        )
    return choice


def prepare_attention(backend: str, segment_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The attention of one forward over packed rows: called as `attend(q, k, v, dropout)`."""
    return {
        "sdpa": DenseMask,
        "documents": DocumentBuckets,
        "flex": FlexBlocks,
        "varlen": lambda s: Varlen(s, torch_kernel=True),
        "flash": lambda s: Varlen(s, torch_kernel=False),
    }[backend](segment_ids)


def segment_mask(q_segments: torch.Tensor, k_segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: query attends key iff same segment and key not in the future.

    Queries are the last Tq of the Tk positions (a KV cache holds the earlier ones).
    """
    tq, tk = q_segments.shape[1], k_segments.shape[1]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=q_segments.device).tril(tk - tq)
    same = q_segments.unsqueeze(2) == k_segments.unsqueeze(1)
    return (same & causal).unsqueeze(1)


def document_runs(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of equal segment id in each row, rows laid end to end: (flat start, length, segment id).

    On a GPU this waits for the device once (the runs decide the shapes of what follows).
    """
    flat = segments.flatten()
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    change[:: segments.shape[1]] = True
    starts = change.nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    return starts, ends - starts, flat[starts]


class DenseMask:
    """The reference: SDPA with the full [T, T] document mask of each row."""

    def __init__(self, segments: torch.Tensor):
        self.mask = segment_mask(segments, segments)

    def __call__(self, q, k, v, dropout: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout)


class DocumentBuckets:
    """Each document attends causally to itself only; documents of similar length share one SDPA call.

    A bucket gathers its documents' positions into [n, L] (shorter ones padded at their end, which
    causal attention keeps their real queries from seeing), runs causal SDPA, and the real positions
    are scattered back. Padding positions (segment 0) get zeros: no label is ever read from them.
    Rows that are each one document need no gathering at all.
    """

    def __init__(self, segments: torch.Tensor):
        starts, lengths, ids = (t.cpu() for t in document_runs(segments))
        real = ids != 0
        self.whole_rows = bool(real.all()) and len(starts) == segments.shape[0]
        if self.whole_rows:
            return
        starts, lengths = starts[real], lengths[real]
        order = lengths.argsort(descending=True)
        starts, lengths = starts[order].tolist(), lengths[order].tolist()
        device = segments.device
        self.buckets: list[torch.Tensor] = []  # [n, L] flat positions of each bucket's slots
        keep, targets = [], []  # which slots are real (over all buckets in order), and where they go
        offset, first = 0, 0
        while first < len(starts):
            longest = lengths[first]
            last = first
            while last < len(starts) and (
                lengths[last] >= BUCKET_FILL * longest or lengths[last] >= longest - BUCKET_SLACK
            ):
                last += 1
            begin = torch.tensor(starts[first:last]).unsqueeze(1)
            size = torch.tensor(lengths[first:last]).unsqueeze(1)
            step = torch.arange(longest).unsqueeze(0)
            valid = step < size
            positions = torch.where(valid, begin + step, begin)  # a pad slot repeats the first token
            self.buckets.append(positions.to(device))
            keep.append(offset + valid.flatten().nonzero().flatten())
            targets.append(positions[valid])
            offset += valid.numel()
            first = last
        self.keep = torch.cat(keep).to(device) if keep else torch.zeros(0, dtype=torch.long, device=device)
        self.targets = torch.cat(targets).to(device) if targets else self.keep

    def __call__(self, q, k, v, dropout: float) -> torch.Tensor:
        if self.whole_rows:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self._buckets(q, k, v, dropout)

    # Inside a compiled layer, the buckets (their number and shapes change every batch) stay eager.
    @torch.compiler.disable
    def _buckets(self, q, k, v, dropout: float) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        # [B, H, T, D] -> [B*T, H, D] (a view: the projections produced [B, T, H, D])
        q, k, v = (y.transpose(1, 2).reshape(batch * length, heads, dim) for y in (q, k, v))
        outputs = []
        for positions in self.buckets:
            n, size = positions.shape
            flat = positions.flatten()
            picked = [y.index_select(0, flat).view(n, size, heads, dim).transpose(1, 2) for y in (q, k, v)]
            out = F.scaled_dot_product_attention(*picked, dropout_p=dropout, is_causal=True)
            outputs.append(out.transpose(1, 2).reshape(n * size, heads, dim))
        slots = torch.cat(outputs).index_select(0, self.keep) if outputs else q[:0]
        out = q.new_zeros(batch * length, heads, dim).index_copy(0, self.targets, slots)
        return out.view(batch, length, heads, dim).transpose(1, 2)


_compiled_flex: dict[str, Callable] = {}


def _flex_attention() -> Callable:
    """FlexAttention compiled once per process: uncompiled, it computes the whole score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    if "flex" not in _compiled_flex:
        _compiled_flex["flex"] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex["flex"]


class FlexBlocks:
    """FlexAttention with a block mask built from the segment ids: wholly masked blocks are skipped."""

    def __init__(self, segments: torch.Tensor):
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(batch, head, query, key):
            return (segments[batch, query] == segments[batch, key]) & (query >= key)

        batch, length = segments.shape
        self.block_mask = create_block_mask(
            same_document, batch, None, length, length, device=segments.device.type
        )

    def __call__(self, q, k, v, dropout: float) -> torch.Tensor:
        return _flex_attention()(q, k, v, block_mask=self.block_mask)


class Varlen:
    """Variable-length flash kernels: each run of equal segment ids is its own causal sequence.

    The bound on sequence length is the row length: the kernels only size their grid with it, and
    the true maximum would cost another host sync (and make a compiled layer recompile whenever it
    changes).
    """

    def __init__(self, segments: torch.Tensor, torch_kernel: bool):
        starts, _, _ = document_runs(segments)
        self.cu = torch.cat([starts, starts.new_tensor([segments.numel()])]).to(torch.int32)
        self.max_len = segments.shape[1]
        self.torch_kernel = torch_kernel

    def __call__(self, q, k, v, dropout: float) -> torch.Tensor:
        b, h, t, d = q.shape
        q, k, v = (y.transpose(1, 2).reshape(b * t, h, d) for y in (q, k, v))
        if self.torch_kernel:
            out = varlen_attn(q, k, v, self.cu, self.cu, self.max_len, self.max_len, window_size=(-1, 0))
        else:
            out = flash_attn_varlen_func(
                q, k, v, self.cu, self.cu, self.max_len, self.max_len, dropout_p=dropout, causal=True
            )
        return out.reshape(b, t, h, d).transpose(1, 2)
