"""Per-token cross-entropy computed a block of rows at a time.

`F.cross_entropy` keeps the fp32 log-softmax of all the logits for its backward pass (and first
makes an fp32 copy of half-precision logits): for the paper model (vocabulary 64k, 4 x 2048 tokens)
that is 2 GB held from the loss to the backward pass, at the step's peak of memory. Here each block
of rows is upcast, reduced to its losses and dropped; the backward pass recomputes the softmax block
by block from the logits, which the forward's output keeps anyway. Same values as
`F.cross_entropy(..., reduction="none")` up to fp32 rounding, at the same cost.
"""

from __future__ import annotations

import torch

from kosmos.tokenizer import IGNORE_INDEX

BLOCK_ELEMENTS = 2**27  # fp32 scratch of one block: 512 MB


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        learned = labels != IGNORE_INDEX
        targets = labels.clamp(min=0).unsqueeze(1)  # any valid index where nothing is learned
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _blocks(logits):
            log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
            loss[rows] = log_probs.gather(1, targets[rows]).squeeze(1).neg_()
        ctx.save_for_backward(logits, targets, learned)
        return loss.masked_fill_(~learned, 0.0)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, learned = ctx.saved_tensors
        weight = (grad_loss * learned).unsqueeze(1)
        blocks = _blocks(logits)
        grad = None if len(blocks) == 1 else torch.empty_like(logits)
        for rows in blocks:
            block = torch.softmax(logits[rows].float(), dim=-1)  # d loss / d logits = softmax - onehot
            block.scatter_add_(1, targets[rows], torch.full_like(targets[rows], -1, dtype=block.dtype))
            block = block.mul_(weight[rows]).to(logits.dtype)
            if grad is None:
                return block, None
            grad[rows] = block
        return grad, None


def _blocks(logits: torch.Tensor) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // logits.shape[1])
    return [slice(start, start + step) for start in range(0, logits.shape[0], step)]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each row of `logits` [N, V] against `labels` [N] in fp32; 0 where the label is -100."""
    return _TokenCrossEntropy.apply(logits, labels)
