"""A kosmos checkpoint as an lmms-eval model, `kosmos`: the multimodal benchmarks of lmms-eval's
tables, and the KOSMOS-1 protocols through the task files in `kosmos/configs/lmms/`.

lmms-eval finds models outside its package through the `lmms_eval.models` entry points; an
installed kosmos declares `kosmos` there (pyproject.toml, `kosmos.eval.lmms_entry`), so

    lmms-eval --model kosmos --model_args checkpoint=RUN --tasks kosmos_caption,kosmos_vqa \\
        --include_path "$(python -m kosmos.eval.lmms_entry)"

runs our checkpoint on our task files (or on any lmms-eval task). Requests go through the same
`ModelBackend` as `kosmos eval`:
- loglikelihood: the context and the document's images, then the continuation scored, as the
  choices of a `rank_choices` task (with `is_greedy`);
- generate_until: the same prompt, decoded greedily or with `num_beams` beams, cut at `until`.
A context lays its images out where it says `<image>` (in the order the document gives them), or all
before its text when it says none (the KOSMOS-1 layout, `<image> An image of`); `</s>` in a context
ends a demonstration, which is then a document of its own, as `kosmos eval` lays out few-shot
prompts.
"""

from __future__ import annotations

from lmms_eval.api.model import lmms

from kosmos.eval.backend import ModelBackend, harness_backend
from kosmos.eval.prompts import DEMO_END, Prompt
from kosmos.eval.tasks import DecodingConfig

IMAGE_MARK = "<image>"
DEMO_MARK = "</s>"
DEFAULT_MAX_NEW_TOKENS = 64


def interleave(context: str, images: list) -> Prompt:
    """Prompt parts: the images at the context's `<image>` marks in order (or all before the text
    when it marks none), and a demonstration's end at each `</s>`."""
    if IMAGE_MARK not in context:
        context = IMAGE_MARK * len(images) + context
    if context.count(IMAGE_MARK) != len(images):
        raise ValueError(
            f"the context marks {context.count(IMAGE_MARK)} images but the document has {len(images)}"
        )
    parts: Prompt = []
    remaining = iter(images)
    for n, document in enumerate(context.split(DEMO_MARK)):
        if n:
            parts.append(DEMO_END)
        for m, text in enumerate(document.split(IMAGE_MARK)):
            if m:
                parts.append(next(remaining))
            if text.strip():
                parts.append(text.strip())
    return parts


def decoding_of(gen_kwargs: dict) -> DecodingConfig:
    until = gen_kwargs.get("until", ["\n"])
    beams = int(gen_kwargs.get("num_beams", 1) or 1)
    sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0) or 0) > 0
    strategy = "beam" if beams > 1 else "sample" if sample else "greedy"
    return DecodingConfig(
        strategy=strategy,
        num_beams=max(beams, 1),
        max_new_tokens=int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        temperature=float(gen_kwargs.get("temperature", 1.0) or 1.0) if sample else 1.0,
        stop=[until] if isinstance(until, str) else list(until),
    )


class KosmosLMMS(lmms):
    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = None,
        backend: ModelBackend | None = None,
        **_: object,
    ):
        super().__init__()
        self.backend = backend or harness_backend(checkpoint, device, batch_size)

    # --- requests to prompts ------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _prompt(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> Prompt:
        doc = self._doc(task, split, doc_id)
        images = doc_to_visual(doc) if doc_to_visual is not None else []
        return interleave(context, images or [])

    # --- the lmms interface -----------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        prompts, continuations = [], []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            continuation = (
                doc_to_target
                if isinstance(doc_to_target, str)
                else doc_to_target(self._doc(task, split, doc_id))
            )
            prompts.append(self._prompt(context, doc_to_visual, doc_id, task, split))
            continuations.append(continuation)
        return self.backend.log_likelihood(prompts, continuations, greedy=True)

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        decodings = []
        prompts = []
        for n, (context, gen_kwargs, doc_to_visual, doc_id, task, split) in enumerate(
            r.args for r in requests
        ):
            decodings.append(decoding_of(gen_kwargs))
            prompts.append(self._prompt(context, doc_to_visual, doc_id, task, split))
            groups.setdefault(repr(decodings[-1]), []).append(n)
        outputs = [""] * len(requests)
        for members in groups.values():
            texts = self.backend.generate([prompts[n] for n in members], decodings[members[0]])
            for n, text in zip(members, texts):
                outputs[n] = text
        return outputs

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("kosmos answers single-round prompts only")
