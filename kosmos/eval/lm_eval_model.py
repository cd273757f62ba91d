"""A kosmos checkpoint as an lm-evaluation-harness model, `kosmos`: the text benchmarks the field
reports (HellaSwag, PIQA, Winogrande, BoolQ, COPA, ...), from the checkpoint `kosmos eval` scores.

lm-eval 0.4 looks models up in its registry, which `register_model` fills when the module defining a
model is imported; it discovers no models outside its own package. This module registers `kosmos`,
and run as a program it is lm-eval's command line with the model known:

    python -m kosmos.eval.lm_eval_model --model kosmos --model_args checkpoint=RUN \\
        --tasks hellaswag,piqa --num_fewshot 0 --batch_size 8 --device cpu

From Python: `import kosmos.eval.lm_eval_model`, then `lm_eval.simple_evaluate(model="kosmos",
model_args="checkpoint=RUN", ...)`. A transformers Kosmos-2 is evaluated once `kosmos convert
from-hf` has made it a checkpoint.

The requests go through the same `ModelBackend` as `kosmos eval`: a context is one text part of the
prompt and a continuation is scored as the choices of a `rank_choices` task are, so both harnesses
rank the options of an item alike. Text parts start a new word (SentencePiece's dummy prefix), so a
continuation that continues the context's last word mid-word is scored as a word of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from kosmos.eval.backend import ModelBackend, harness_backend
from kosmos.eval.tasks import DecodingConfig
from kosmos.tokenizer import BOS, Encoded

DEFAULT_MAX_GEN_TOKS = 256


@register_model("kosmos")
class KosmosLM(LM):
    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        backend: ModelBackend | None = None,
        **_: object,
    ):
        super().__init__()
        self.backend = backend or harness_backend(checkpoint, device, batch_size)

    @property
    def tokenizer_name(self) -> str:
        return "kosmos"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts = [[context] if context.strip() else [] for context, _ in (r.args for r in requests)]
        continuations = [continuation for _, continuation in (r.args for r in requests)]
        return self.backend.log_likelihood(contexts, continuations, greedy=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after `<s>`, in windows of the model's positions, each
        window seeing the tokens before it up to that length."""
        from kosmos.model import sequence_log_likelihood

        backend = self.backend
        totals = []
        for (text,) in (r.args for r in requests):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=backend.tokenizer.encode(text),
                    prefix_token=BOS,
                    max_seq_len=backend.max_positions,
                    context_len=1,
                )
            ]
            sequences = [_scored(context, target) for context, target in windows]
            total = 0.0
            for start in range(0, len(sequences), backend.batch_size):
                chunk = sequences[start : start + backend.batch_size]
                total += float(sequence_log_likelihood(backend.model, chunk).sum())
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample`) text after each context, cut at the first `until`
        string; requests with the same generation settings are decoded in batches."""
        groups: dict[str, list[int]] = {}
        settings = []
        for n, request in enumerate(requests):
            decoding = _decoding(request.args[1])
            settings.append(decoding)
            groups.setdefault(repr(decoding), []).append(n)
        outputs: list[str] = [""] * len(requests)
        for members in groups.values():
            prompts = [[requests[n].args[0]] for n in members]
            for n, text in zip(members, self.backend.generate(prompts, settings[members[0]])):
                outputs[n] = text
        return outputs


def _scored(context: Sequence[int], target: Sequence[int]) -> Encoded:
    """A token window whose `target` tokens are scored after its `context` tokens."""
    ids = list(context) + list(target)
    learn = [False] * len(context) + [True] * len(target)
    return Encoded(ids=ids, image_mask=[False] * len(ids), learn=learn)


def _decoding(gen_kwargs: dict) -> DecodingConfig:
    until = gen_kwargs.get("until", [])
    sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 1.0)) > 0
    return DecodingConfig(
        strategy="sample" if sample else "greedy",
        max_new_tokens=int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 1.0,
        stop=[until] if isinstance(until, str) else list(until),
    )


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    torch.set_grad_enabled(False)
    cli_evaluate()


if __name__ == "__main__":
    main()
