"""A checkpoint continuing prompts of images and text: what `kosmos generate` and `kosmos serve` share.

A prompt is a list of parts in reading order, each a text or an image. Images come as bytes and are
decoded with the loader's decoder (JPEG, PNG or WebP; decompression bombs refused), so a file that is
not an image, or too large, is an `InputError` saying which and why, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from kosmos.config import InputError

# The decoding settings both commands offer, with `kosmos generate`'s defaults.
DEFAULT_MAX_NEW_TOKENS = 20


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    beams: int = 1  # 1: greedy

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max new tokens: must be at least 1, got {self.max_new_tokens}")
        if self.beams < 1:
            raise InputError(f"beams: must be at least 1, got {self.beams}")

    def command_line(self) -> list[str]:
        """The `kosmos generate` options of these settings."""
        return ["--max-new-tokens", str(self.max_new_tokens)] + (["--beams", str(self.beams)] if self.beams > 1 else [])


def read_image(data: bytes, name: str, max_bytes: int | None = None):
    """A PIL image from the bytes of file `name`; InputError naming the file if it cannot be one."""
    from kosmos.data.decode import decode_image
    from kosmos.data.skips import SkipSample

    if max_bytes is not None and len(data) > max_bytes:
        raise InputError(f"{name} is {len(data) / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB an image may have")
    try:
        return decode_image(data)
    except SkipSample as error:
        raise InputError(f"{name} cannot be used: {error.reason.replace('_', ' ')} (JPEG, PNG or WebP)") from None


def read_image_file(path: str | Path, max_bytes: int | None = None):
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    return read_image(data, Path(path).name, max_bytes)


class Prompter:
    """A checkpoint's model, tokenizer and image transform, loaded once, continuing prompts."""

    def __init__(self, checkpoint: str | Path, device: str | None = None, fp32: bool = False):
        import torch

        from kosmos.checkpoint import load_model_from_checkpoint
        from kosmos.data import image_transform
        from kosmos.model import inference_dtype

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # stdout is for the generated text: DeepSpeed, imported here for the first time, binds its
        # log handler to whatever stdout is at that moment.
        with contextlib.redirect_stdout(sys.stderr):
            self.model, self.tokenizer, self.model_cfg = load_model_from_checkpoint(checkpoint, self.device)
        self.model.to(inference_dtype(self.device, fp32))
        self.transform = image_transform(self.model_cfg.vision.image_size)

    def continue_prompt(self, parts: list, decoding: Decoding) -> str:
        """The text the model generates after `parts` (texts and PIL images, in order)."""
        import torch

        from kosmos.model import generate

        decoding.check()
        if not any(isinstance(part, str) and part for part in parts):
            raise InputError("the prompt needs some text")
        pictures = [self.transform(p) for p in parts if not isinstance(p, str)]
        images = torch.stack(pictures) if pictures else None
        prompt = self.tokenizer.encode_interleaved(parts, self.model_cfg.connector.num_queries, eos=False)
        new_ids = generate(
            self.model,
            [prompt],
            images,
            max_new_tokens=decoding.max_new_tokens,
            strategy="beam" if decoding.beams > 1 else "greedy",
            num_beams=decoding.beams,
        )[0]
        return self.tokenizer.decode(new_ids)
