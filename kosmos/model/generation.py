"""Decoding (greedy, beam search, sampling) and likelihood scoring over interleaved prompts.

Prompts are `Encoded` sequences from `Tokenizer.encode_interleaved(..., eos=False)`; `images` holds
every prompt's images in prompt order. Batched prompts are left-padded: padding gets segment 0, so it
is never attended to, and positions count real tokens only, so a padded row decodes exactly as it
would alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch

from kosmos.data.batch import Batch
from kosmos.model.kosmos import KosmosModel, KVCache
from kosmos.tokenizer import EOS, IGNORE_INDEX, PAD, Encoded


def pad_batch(
    sequences: Sequence[Encoded],
    side: Literal["left", "right"],
    device: torch.device | str = "cpu",
    images: torch.Tensor | None = None,
) -> Batch:
    """The batch of sequences of different lengths, one document per row, with the sequences' `images`."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    image_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    segment_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    position_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq.ids)
        image_mask[row, span] = torch.tensor(seq.image_mask)
        segment_ids[row, span] = 1
        position_ids[row, span] = torch.arange(len(seq))
    return Batch(input_ids, image_mask, position_ids, segment_ids, images).to(device)


def _images_for_rows(sequences: Sequence[Encoded], images: torch.Tensor | None, repeats: int):
    """The images of each prompt repeated for each of its `repeats` rows (row-major image order)."""
    if images is None or images.shape[0] == 0 or repeats == 1:
        return images
    counts = torch.tensor([s.num_images for s in sequences], device=images.device)
    starts = torch.cumsum(counts, 0) - counts
    index = [
        torch.arange(start, start + count, device=images.device)
        for start, count in zip(starts.tolist(), counts.tolist())
        for _ in range(repeats)
    ]
    return images.index_select(0, torch.cat(index))


def _check_images(sequences: Sequence[Encoded], images: torch.Tensor | None) -> None:
    wanted = sum(s.num_images for s in sequences)
    given = 0 if images is None else images.shape[0]
    if wanted != given:
        raise ValueError(f"the prompts hold {wanted} images but {given} were given")


class _Decoder:
    """Runs the model one step at a time, with a KV cache or by re-reading the whole sequence."""

    def __init__(self, model: KosmosModel, batch: Batch, use_cache: bool, max_new_tokens: int, compile: bool):
        if compile and not use_cache:
            raise ValueError("compile=True compiles the cached decoding step: it needs use_cache=True")
        self.model = model
        self.use_cache = use_cache
        # Only the one-token steps: they share one graph, while prompts (and images) vary in shape.
        self.step_forward = model.compiled_forward() if compile else model
        self.batch = batch
        capacity = batch.input_ids.shape[1] + max_new_tokens
        self.cache = KVCache(len(model.layers), capacity) if use_cache else None
        self.next_position = batch.position_ids[:, -1] + 1

    def first(self) -> torch.Tensor:
        out = self.model(**self.batch.inputs(), cache=self.cache)
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        b = self.batch
        position = self.next_position.unsqueeze(1)
        self.next_position = self.next_position + 1
        if self.use_cache:
            out = self.step_forward(tokens.unsqueeze(1), position_ids=position, cache=self.cache)
            return out.logits[:, -1].float()
        self.batch = b = Batch(
            torch.cat([b.input_ids, tokens.unsqueeze(1)], 1),
            torch.cat([b.image_mask, torch.zeros_like(tokens, dtype=torch.bool).unsqueeze(1)], 1),
            torch.cat([b.position_ids, position], 1),
            torch.cat([b.segment_ids, torch.ones_like(position)], 1),
            b.images,
        )
        return self.model(**b.inputs()).logits[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        # Rows only move among one prompt's beams, which share its images: the images stay put.
        self.next_position = self.next_position.index_select(0, rows)
        if self.use_cache:
            self.cache.reorder(rows)
        else:
            self.batch = self.batch.rows(rows)


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.inference_mode()
def generate(
    model: KosmosModel,
    prompts: Sequence[Encoded],
    images: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    strategy: Literal["greedy", "beam", "sample"] = "greedy",
    num_beams: int = 5,
    length_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = EOS,
    seed: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt, stopping at `eos_id` (which is not returned).

    `compile` runs the decoding steps through `KosmosModel.compiled_forward`: the same tokens, with a
    one-time compilation (tens of seconds) that pays off over many steps, as in an evaluation.
    """
    _check_images(prompts, images)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        if images is not None:
            images = images.to(device)
        if strategy == "beam":
            return _beam_search(model, prompts, images, max_new_tokens, num_beams, length_penalty, eos_id,
                                device, use_cache, compile)
        generator = None
        if strategy == "sample":
            generator = torch.Generator(device=device)
            generator.manual_seed(0 if seed is None else seed)
        decoder = _Decoder(model, pad_batch(prompts, "left", device, images), use_cache, max_new_tokens, compile)
        logits = decoder.first()
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        # Tokens stay on the device until the end: one host sync per step (the stopping test).
        steps = []
        for step in range(max_new_tokens):
            if strategy == "sample":
                probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                tokens = logits.argmax(-1)
            tokens = tokens.masked_fill(finished, PAD)
            steps.append(tokens)
            finished |= tokens == eos_id
            if step == max_new_tokens - 1 or finished.all():
                break
            logits = decoder.step(tokens)
        rows = torch.stack(steps, 1).tolist()
        return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]
    finally:
        model.train(was_training)


def _beam_search(
    model, prompts, images, max_new_tokens, num_beams, length_penalty, eos_id, device, use_cache, compile
):
    k = num_beams
    batch = len(prompts)
    decoder = _Decoder(model, pad_batch(prompts, "left", device, images), use_cache, max_new_tokens, compile)
    # One forward per prompt, its images included; its k beams start from copies of it.
    logits = decoder.first()
    per_prompt = torch.arange(batch, device=device).repeat_interleave(k)
    decoder.reorder(per_prompt)
    # Re-reading the rows (no cache) needs each beam's images.
    decoder.batch = dataclasses.replace(decoder.batch, images=_images_for_rows(prompts, images, k))
    logits = logits.index_select(0, per_prompt)
    beam_scores = torch.full((batch, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    beam_tokens: list[list[int]] = [[] for _ in range(batch * k)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    for step in range(max_new_tokens):
        log_probs = logits.log_softmax(-1)
        vocab = log_probs.shape[-1]
        scores = (beam_scores.view(-1, 1) + log_probs).view(batch, k * vocab)
        top_scores, top_ids = scores.topk(2 * k, dim=1)
        next_scores = torch.full((batch, k), float("-inf"), device=device)
        next_rows = torch.arange(batch * k, device=device).view(batch, k).clone()
        next_tokens = torch.full((batch, k), PAD, dtype=torch.long, device=device)
        for b in range(batch):
            if done[b]:
                continue
            chosen = 0
            for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                beam, token = divmod(flat, vocab)
                row = b * k + beam
                if token == eos_id:
                    if rank < k:
                        generated = beam_tokens[row]
                        finished[b].append((score / (len(generated) + 1) ** length_penalty, list(generated)))
                    continue
                next_scores[b, chosen], next_rows[b, chosen], next_tokens[b, chosen] = score, row, token
                chosen += 1
                if chosen == k:
                    break
            # Done when the best live beam, scored at its present length, does no better than the
            # k-th best finished one (transformers' beam search with `early_stopping=False`).
            best_alive = next_scores[b].max().item() / (step + 1) ** length_penalty
            if len(finished[b]) >= k and sorted(s for s, _ in finished[b])[-k] >= best_alive:
                done[b] = True
        flat_rows = next_rows.view(-1)
        beam_tokens = [beam_tokens[r] + [t] for r, t in zip(flat_rows.tolist(), next_tokens.view(-1).tolist())]
        beam_scores = next_scores
        if all(done) or step == max_new_tokens - 1:
            break
        decoder.reorder(flat_rows)
        logits = decoder.step(next_tokens.view(-1))

    results = []
    for b in range(batch):
        candidates = list(finished[b])
        if not done[b]:
            for j in range(k):
                score = beam_scores[b, j].item()
                if score > float("-inf"):
                    tokens = beam_tokens[b * k + j]
                    candidates.append((score / max(1, len(tokens)) ** length_penalty, tokens))
        results.append(max(candidates, key=lambda c: c[0])[1] if candidates else [])
    return results


def inference_dtype(device: str | torch.device, fp32: bool) -> torch.dtype:
    """Evaluation's and generation's dtype: bf16 on a GPU that has it (fp32 there runs an order of
    magnitude slower, TF32 being off), unless `fp32`; fp32 on the CPU."""
    if fp32 or torch.device(device).type != "cuda" or not torch.cuda.is_bf16_supported():
        return torch.float32
    return torch.bfloat16


@torch.no_grad()
def sequence_log_likelihood(
    model: KosmosModel, sequences: Sequence[Encoded], images: torch.Tensor | None = None, greedy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of each sequence's learned tokens (`Encoded.learn`), one per row; with
    `greedy`, also whether each learned token is the model's most likely one, all of them (a bool
    per row: lm-evaluation-harness's `is_greedy`).

    Candidate ranking (classification, Raven's P("Yes")) marks the prompt as not learned and the
    candidate as learned.
    """
    _check_images(sequences, images)
    device = next(model.parameters()).device
    batch = pad_batch(sequences, "right", device, images)
    batch.labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for row, seq in enumerate(sequences):
        batch.labels[row, : len(seq)] = torch.tensor(seq.labels())
    was_training = model.training
    model.eval()
    try:
        out = model(**batch.inputs())
    finally:
        model.train(was_training)
    scores = -out.token_loss.sum(1)
    if not greedy:
        return scores
    # The logits are those of the labelled positions, in row order.
    flat = batch.labels.flatten()
    labelled = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    missed = (out.logits.argmax(-1) != flat[labelled]).long()
    rows = labelled // batch.labels.shape[1]
    return scores, torch.zeros(len(sequences), dtype=torch.long, device=device).index_add(0, rows, missed) == 0
