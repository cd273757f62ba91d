"""The model seen by the runners: generate text after a prompt, or score a continuation's likelihood.

Prompts are interleaved parts (text and images); they are laid out with `Tokenizer.encode_interleaved`
(`<s>`, no closing `</s>`; each few-shot demonstration is a document of its own, `<s> ... </s>`) and
images go through the CLIP transform the model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from kosmos.config import ConfigError
from kosmos.eval.datasets import load_image
from kosmos.eval.prompts import DEMO_END, Prompt, is_image
from kosmos.eval.tasks import DecodingConfig
from kosmos.tokenizer import Encoded, Tokenizer


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the first stop string, stripped."""
    for marker in stop:
        if marker and marker in text:
            text = text[: text.index(marker)]
    return text.strip()


def layout_prompt(
    tokenizer: Tokenizer, num_image_tokens: int, prompt: Prompt, continuation: str | None = None
) -> Encoded:
    """The tokens of a prompt (and of a continuation scored after it), as the model reads them."""
    documents: list[list] = [[]]
    for part in prompt:
        if part is DEMO_END:
            documents.append([])
        else:
            documents[-1].append(part)
    encoded = Encoded()
    for n, document in enumerate(documents):
        last = n == len(documents) - 1
        parts = document + ([continuation] if last and continuation is not None else [])
        learn = [False] * len(document) + ([True] if last and continuation is not None else [])
        piece = tokenizer.encode_interleaved(parts, num_image_tokens, bos=True, eos=not last, learn=learn)
        encoded.ids += piece.ids
        encoded.image_mask += piece.image_mask
        encoded.learn += piece.learn
        encoded.num_images += piece.num_images
    return encoded


class ModelBackend:
    def __init__(self, model, tokenizer: Tokenizer, batch_size: int = 8, compile: bool = False):
        from kosmos.data import image_transform

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.compile = compile  # decoding steps through `KosmosModel.compiled_forward`
        self.num_image_tokens = model.cfg.connector.num_queries
        self.max_positions = model.cfg.text.max_positions
        self.transform = image_transform(model.cfg.vision.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(
        self, prompt: Prompt, continuation: str | None = None, seen: dict | None = None, reserve: int = 0
    ) -> tuple[Encoded, list[torch.Tensor]]:
        """Token layout and image tensors of one prompt, with `reserve` positions left for generation;
        `seen` keeps images already transformed in this call (ranking repeats a prompt's images)."""
        seen = {} if seen is None else seen
        encoded = layout_prompt(self.tokenizer, self.num_image_tokens, prompt, continuation)
        if len(encoded) + reserve > self.max_positions:
            raise ValueError(
                f"a prompt of {len(encoded)} tokens (+{reserve} to generate) exceeds the model's "
                f"{self.max_positions} positions: use fewer shots or fewer new tokens"
            )
        images = []
        for part in prompt:
            if is_image(part):
                if id(part) not in seen:
                    seen[id(part)] = (part, self.transform(load_image(part)))  # the part keeps its id alive
                images.append(seen[id(part)][1])
        return encoded, images

    def _batches(self, items: Sequence) -> list[Sequence]:
        return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.stack(images).to(self.device) if images else None

    def generate(
        self, prompts: Sequence[Prompt], decoding: DecodingConfig, max_new_tokens: int | None = None
    ) -> list[str]:
        from kosmos.model import generate

        max_new_tokens = max_new_tokens or decoding.max_new_tokens
        texts: list[str] = []
        seen: dict = {}
        for batch in self._batches(prompts):
            encoded = [self.encode(p, seen=seen, reserve=max_new_tokens) for p in batch]
            tokens = generate(
                self.model,
                [e for e, _ in encoded],
                self._stack([i for _, imgs in encoded for i in imgs]),
                max_new_tokens=max_new_tokens,
                strategy=decoding.strategy,
                num_beams=decoding.num_beams,
                length_penalty=decoding.length_penalty,
                temperature=decoding.temperature,
                top_k=decoding.top_k,
                top_p=decoding.top_p,
                eos_id=self.tokenizer.eos_id,
                seed=decoding.seed,
                compile=self.compile,
            )
            texts.extend(cut_at_stop(self.tokenizer.decode(t), decoding.stop) for t in tokens)
        return texts

    def log_likelihood(
        self,
        prompts: Sequence[Prompt],
        continuations: Sequence[str],
        normalize: bool = False,
        greedy: bool = False,
    ) -> list[float] | list[tuple[float, bool]]:
        """Log-probability of each continuation after its prompt (mean per token if `normalize`);
        with `greedy`, (log-probability, whether greedy decoding would write the continuation)."""
        from kosmos.model import sequence_log_likelihood

        pairs = list(zip(prompts, continuations, strict=True))
        scores: list = []
        seen: dict = {}
        for batch in self._batches(pairs):
            encoded = [self.encode(p, c, seen) for p, c in batch]
            sequences = [e for e, _ in encoded]
            images = self._stack([i for _, imgs in encoded for i in imgs])
            values, is_greedy = sequence_log_likelihood(self.model, sequences, images, greedy=True)
            for seq, value, flag in zip(sequences, values.tolist(), is_greedy.tolist()):
                value = value / max(1, sum(seq.learn)) if normalize else value
                scores.append((value, flag) if greedy else value)
        return scores


def eval_config(path: str | Path):
    """(model_cfg, tokenizer) of a run folder or checkpoint folder, without its weights."""
    from kosmos.checkpoint import CheckpointError, checkpoint_config

    try:
        _, model_cfg, tokenizer = checkpoint_config(path)
    except CheckpointError as error:
        raise ConfigError(f"--checkpoint: {error}") from None
    return model_cfg, tokenizer


def load_for_eval(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, model_cfg) of a run folder (its latest checkpoint) or one checkpoint folder,
    ZeRO shards consolidated, in eval mode on `device` in `dtype`."""
    from kosmos.checkpoint import CheckpointError, load_model_from_checkpoint

    try:
        model, tokenizer, model_cfg = load_model_from_checkpoint(path, device)
    except CheckpointError as error:
        raise ConfigError(f"--checkpoint: {error}") from None
    return model.to(dtype), tokenizer, model_cfg


def harness_backend(checkpoint: str | None, device: str | None, batch_size: int | str | None) -> ModelBackend:
    """The backend the lm-eval and lmms-eval models run (`--model_args checkpoint=...`); their
    `--batch_size` comes as given, a number or "auto" (taken as 8)."""
    if checkpoint is None:
        raise ValueError("--model_args checkpoint=RUN_OR_CHECKPOINT is required for --model kosmos")
    model, tokenizer, _ = load_for_eval(checkpoint, device or "cpu")
    auto = batch_size is None or str(batch_size).startswith("auto")
    return ModelBackend(model, tokenizer, 8 if auto else int(batch_size))
