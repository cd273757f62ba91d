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

`varlen` and `flex` have no attention dropout: they are refused where dropout would apply. A backend
whose kernel the installed torch (or flash-attn) lacks, or has with a signature we do not call, is
refused by name with the version it needs (`BACKENDS`, `unavailable`), and `auto` never picks it.
Under `torch.use_deterministic_algorithms` (`train.deterministic`) only backends with a
deterministic backward run: `sdpa` and `documents` (PyTorch's fused SDPA kernels then take their
deterministic path) and `flash` (its `deterministic` backward).

`auto` picks, for the device, dtype and pass at hand (see `choose_backend`):
- CUDA, training: `flash` if installed (half precision); else, unless dropout applies or the run is
  deterministic, `varlen` (half precision) or `flex`; else `documents`.
- CUDA, forward passes (evaluation, generation): `flash` or `varlen` in half precision, else
  `documents` (`flex` is compiled for fixed shapes: every new padded length would recompile).
- CPU and other devices: `documents` (the fastest measured on CPU for training and for forward
  passes alike; docs/performance.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from kosmos.config import ConfigError
from kosmos.model.config import AttentionChoice

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None


@dataclass(frozen=True)
class Backend:
    """What a backend needs and offers (the kernels' own requirements are in `Varlen`)."""

    requires: str  # the package release that has its kernel with the signature we call
    cuda_only: bool = False
    half_only: bool = False
    dropout: bool = True  # has attention dropout
    trains_on_cpu: bool = True
    deterministic: bool = True  # has a deterministic backward (under deterministic algorithms)


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("torch>=2.4"),
    "documents": Backend("torch>=2.4"),
    "flex": Backend("torch>=2.5", dropout=False, trains_on_cpu=False, deterministic=False),
    "varlen": Backend("torch>=2.10", cuda_only=True, half_only=True, dropout=False, deterministic=False),
    "flash": Backend("flash-attn>=2.5", cuda_only=True, half_only=True),
}
CHOICES = get_args(AttentionChoice)  # "auto" and the backends


def varlen_causal_arguments(kernel: Callable | None) -> dict | None:
    """The keyword arguments that make torch's `varlen_attn` causal, by its signature: torch 2.10
    has `is_causal`; 2.11 and later have `window_size` (left, right), (-1, 0) being causal. None
    where the kernel is missing or has neither."""
    if kernel is None:
        return None
    parameters = inspect.signature(kernel).parameters
    if "window_size" in parameters:
        return {"window_size": (-1, 0)}
    if "is_causal" in parameters:
        return {"is_causal": True}
    return None


def flash_arguments(kernel: Callable | None) -> dict | None:
    """Keyword arguments of flash-attn's `flash_attn_varlen_func` beyond the common ones: its
    `deterministic` backward (flash-attn 2.4.1 and later) when deterministic algorithms are on."""
    if kernel is None or "deterministic" not in inspect.signature(kernel).parameters:
        return None
    return {"causal": True, "deterministic": torch.are_deterministic_algorithms_enabled()}


def unavailable(name: str) -> str | None:
    """Why the installed packages cannot run backend `name` (None: they can)."""
    have = f"this is torch {torch.__version__}"
    if name == "flex" and flex_attention is None:
        return f"flex needs {BACKENDS[name].requires} (FlexAttention); {have}"
    if name == "varlen" and varlen_causal_arguments(varlen_attn) is None:
        found = "has no varlen_attn" if varlen_attn is None else "has a varlen_attn of another signature"
        return f"varlen needs {BACKENDS[name].requires} (torch.nn.attention.varlen); {have}, which {found}"
    if name == "flash" and flash_arguments(flash_attn_varlen_func) is None:
        return f"flash needs {BACKENDS[name].requires} installed (pip install 'kosmos[flash]')"
    return None


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


def refusal(
    name: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, dropout: bool
) -> str | None:
    """Why backend `name` cannot run this pass (None: it can)."""
    backend = BACKENDS[name]
    reason = unavailable(name)
    if reason:
        return reason
    if backend.cuda_only and device.type != "cuda":
        return f"{name} needs a CUDA device"
    if backend.half_only and dtype not in HALF:
        return f"{name} needs fp16/bf16"
    if needs_grad and not backend.trains_on_cpu and device.type != "cuda":
        return f"{name} trains only on CUDA (PyTorch has no backward of it on CPU)"
    if dropout and not backend.dropout:
        return (
            f"{name} has no attention dropout; set model.text.attention_dropout=0 "
            "or choose sdpa, documents or flash"
        )
    if needs_grad and not backend.deterministic and torch.are_deterministic_algorithms_enabled():
        return f"{name} has no deterministic backward (train.deterministic); choose sdpa, documents or flash"
    return None


def choose_backend(
    choice: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, dropout: bool
) -> str:
    """The backend `choice` ("auto" or a name) resolves to; raises ConfigError where it cannot run."""
    if choice == "auto":
        if device.type != "cuda":
            return "documents"
        # `flex` is compiled for fixed shapes: forward passes over ever new padded lengths skip it.
        order = ["flash", "varlen", "flex"] if needs_grad else ["flash", "varlen"]
        runs = (name for name in order if refusal(name, device, dtype, needs_grad, dropout) is None)
        return next(runs, "documents")
    reason = refusal(choice, device, dtype, needs_grad, dropout)
    if reason:
        raise ConfigError(f"model.attention: {reason}")
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
    if "flex" not in _compiled_flex:
        _compiled_flex["flex"] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex["flex"]


class FlexBlocks:
    """FlexAttention with a block mask built from the segment ids: wholly masked blocks are skipped."""

    def __init__(self, segments: torch.Tensor):
        def same_document(batch, head, query, key):
            return (segments[batch, query] == segments[batch, key]) & (query >= key)

        batch, length = segments.shape
        # The segments' own device, index included: on a rank's GPU, not the current default one.
        self.block_mask = create_block_mask(same_document, batch, None, length, length, device=segments.device)

    def __call__(self, q, k, v, dropout: float) -> torch.Tensor:
        return _flex_attention()(q, k, v, block_mask=self.block_mask)


class Varlen:
    """Variable-length flash kernels: each run of equal segment ids is its own causal sequence.

    What both kernels require: q, k, v of shape (total, heads, head_dim), contiguous, fp16/bf16,
    head_dim at most 256; cumulative sequence starts `cu` as int32 on q's device; the bounds on
    sequence length as Python ints. The bound is the row length: the kernels only size their grid
    with it, and the true maximum would cost another host sync (and make a compiled layer recompile
    whenever it changes).
    """

    def __init__(self, segments: torch.Tensor, torch_kernel: bool):
        starts, _, _ = document_runs(segments)
        self.cu = torch.cat([starts, starts.new_tensor([segments.numel()])]).to(torch.int32)
        self.max_len = segments.shape[1]
        self.torch_kernel = torch_kernel
        # Read once per forward, not in every layer (nor inside a compiled one).
        self.options = varlen_causal_arguments(varlen_attn) if torch_kernel else flash_arguments(flash_attn_varlen_func)

    def __call__(self, q, k, v, dropout: float) -> torch.Tensor:
        b, h, t, d = q.shape
        # [B, H, T, D] views of the projections' [B, T, H, D]: back to contiguous (B*T, H, D).
        q, k, v = (y.transpose(1, 2).reshape(b * t, h, d) for y in (q, k, v))
        bounds = (self.cu, self.cu, self.max_len, self.max_len)
        if self.torch_kernel:
            out = varlen_attn(q, k, v, *bounds, **self.options)
        else:
            out = flash_attn_varlen_func(q, k, v, *bounds, dropout_p=dropout, **self.options)
        return out.reshape(b, t, h, d).transpose(1, 2)
