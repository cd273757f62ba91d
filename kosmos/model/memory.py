"""Activation memory of a training step: what autograd keeps from the forward for the backward pass.

Counted tensor by tensor from the model's code (`kosmos.model.kosmos`, open_clip's blocks), for
`rows` sequences of `seq_len` positions holding `images` images, of which `labelled` positions have a
learned label. Names: N positions (rows x seq_len), d the decoder's width, f its FFN width, e the bytes
of an activation (2 in bf16, 4 in fp32), V the vocabulary.

One decoder layer keeps 9 N d e (the layer input, the LayerNorm outputs, q, k and v, the attention
output, the residual sum) + 3 N f e (fc1 output, GELU output, FFN LayerNorm output) + 32 N (mean and
inverse standard deviation of its four LayerNorms, fp32), and, by attention backend
(`kosmos.model.attention`, the same names):
- every fused kernel: the log-sum-exp of each query and head, 4 bytes;
- `sdpa`: also the packed-document mask, which PyTorch's fused kernels receive as a float tensor,
  rows x seq_len^2 x e, in every layer;
- `documents`: also its gathered copies of q, k and v and its output before the scatter, 4 N d e
  (rows packed with several documents; rows of one document each need none);
- `flex`, `varlen`, `flash`: nothing more.
`fused=False` is PyTorch's unfused math kernel, which the CPU runs for `sdpa` when attention dropout
is on: the softmax, its dropout noise and the dropped-out probabilities, 3 x rows x heads x seq_len^2
x e, instead of the log-sum-exp and mask.
Dropout adds its mask after the attention and after the FFN (and on the embeddings): 1 byte per
element on a GPU, e bytes on a CPU (where the mask is kept in the activation's dtype).

The LM head keeps its input and its logits at the labelled positions (`labelled` x V x e): the loss
(`kosmos.model.loss`) keeps no fp32 copy. Each trainable vision block keeps 20 w e per image token
(w its width; the MLP is 4w wide with QuickGELU's three tensors), the tower's output LayerNorm and
normalisation 3 w e, and the connector about 3 (S + 2Q) d e per image (S image tokens, Q queries).
Frozen blocks keep nothing. A checkpointed decoder layer keeps only its input (N d e).

The peak of a step comes at the start of the backward pass: everything kept, plus the gradient of
the logits (labelled x V x e) and the fp32 softmax the loss recomputes block by block (at most
`BLOCK_ELEMENTS` x 4 bytes); or, with checkpointing, when the top checkpointed layer is recomputed:
by then the head's and the layers above's tensors are freed, and that layer's are kept again. `activation_memory`
returns the parts and that peak; `docs/performance.md` compares it with measured peaks.
"""

from __future__ import annotations

from kosmos.model.config import ModelConfig
from kosmos.model.loss import BLOCK_ELEMENTS

STAT_BYTES = 8  # a LayerNorm's fp32 mean and inverse standard deviation, per normalised vector
INDEX_BYTES = 8  # int64 token ids and positions


def decoder_layer_bytes(
    cfg: ModelConfig, rows: int, seq_len: int, dtype_bytes: int, backend: str, mask_bytes: int, fused: bool = True
) -> int:
    text, e = cfg.text, dtype_bytes
    tokens = rows * seq_len
    kept = tokens * (9 * text.width * e + 3 * text.ffn_width * e + 4 * STAT_BYTES)
    if text.dropout > 0:
        kept += 2 * tokens * text.width * mask_bytes
    if text.activation_dropout > 0:
        kept += tokens * text.ffn_width * mask_bytes
    scores = rows * text.heads * seq_len * seq_len
    if not fused:
        return kept + 3 * scores * e
    kept += rows * text.heads * seq_len * 4  # log-sum-exp
    if backend == "sdpa":
        kept += rows * seq_len * seq_len * e
    if backend == "documents":
        kept += 4 * tokens * text.width * e
    return kept


def vision_bytes(cfg: ModelConfig, images: int, dtype_bytes: int, fused: bool = True) -> int:
    """Trainable vision blocks, the tower's output norm and the connector, for `images` images."""
    vision, e = cfg.vision, dtype_bytes
    tokens, queries, width = vision.num_tokens, cfg.connector.num_queries, cfg.text.width
    block = tokens * (20 * vision.width * e + 2 * STAT_BYTES + 4 * vision.heads)
    output = tokens * (3 * vision.width * e + STAT_BYTES + 8)  # ln_post, and the norms of F.normalize
    context = tokens + queries
    connector = width * e * (3 * context + 3 * queries)  # its q, k, v inputs and outputs, the output
    if not fused and cfg.text.attention_dropout > 0:
        connector += 3 * cfg.text.heads * queries * context * e
    else:
        connector += cfg.text.heads * queries * 4
    return images * (vision.trainable_blocks * block + output + connector)


def activation_memory(
    cfg: ModelConfig,
    rows: int,
    seq_len: int,
    images: int,
    labelled: int,
    dtype_bytes: int,
    backend: str,
    mask_bytes: int,
    checkpointed_layers: int = 0,
    fused: bool = True,
) -> dict[str, int]:
    """Bytes kept for the backward pass by part, and `peak`: the most held at once during the step."""
    text, e = cfg.text, dtype_bytes
    tokens = rows * seq_len
    layer = decoder_layer_bytes(cfg, rows, seq_len, dtype_bytes, backend, mask_bytes, fused)
    checkpointed = min(checkpointed_layers, text.layers)
    embedding = tokens * INDEX_BYTES + (tokens if images else 0)  # ids; the image mask
    if text.dropout > 0:
        embedding += tokens * text.width * mask_bytes
    # Final LayerNorm; the labelled positions' indices, hidden states, logits, targets and flags.
    head = tokens * (text.width * e + STAT_BYTES) + labelled * (
        2 * INDEX_BYTES + 1 + text.width * e + text.vocab_size * e
    )
    parts = {
        "decoder_layers": (text.layers - checkpointed) * layer + checkpointed * tokens * text.width * e,
        "embedding": embedding,
        "head": head,
        "vision": vision_bytes(cfg, images, dtype_bytes, fused),
    }
    kept = sum(parts.values())
    logits = labelled * text.vocab_size
    block = min(logits, BLOCK_ELEMENTS) * 4
    # In fp32 a single block is the gradient itself; otherwise the gradient is a tensor of its own.
    loss_backward = block if e == 4 and logits <= BLOCK_ELEMENTS else logits * e + block
    peak = kept + loss_backward
    if checkpointed:
        # Recomputing the top checkpointed layer, once the head and the layers above it are done.
        peak = max(peak, kept - head - (text.layers - checkpointed) * layer + layer)
    return {**parts, "kept": kept, "peak": peak}
