"""From a shard's raw members to a document: text parts and PIL images in reading order.

Each corpus kind has a decoder. A sample that cannot be used raises `SkipSample(reason)`; images
left out of a document that is kept (too small, too elongated, over the per-document cap) are counted in
`Document.dropped_images`. The reasons are those of `kosmos.data.skips`.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from kosmos.data.config import CorpusConfig
from kosmos.data.shards import IMAGE_EXTENSIONS, RawSample
from kosmos.data.skips import Counts, Reason, SkipSample

# About 200 MB once decoded to RGB; anything larger is refused before its pixels are read.
MAX_IMAGE_PIXELS = 1 << 26
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_ASPECT_RATIO = 20


@dataclass
class Document:
    # A str part is text; an Image part is one image, in document order.
    parts: list[str | Image.Image]
    # Per part: are its tokens learned? None = all parts (pretraining data).
    learn: list[bool] | None = None
    dropped_images: Counts = field(default_factory=Counter)


def image_transform(image_size: int) -> Callable:
    """CLIP preprocessing: shorter side resized (bicubic) to `image_size`, centre crop, CLIP mean/std."""
    from open_clip import image_transform as clip_transform

    return clip_transform(image_size, is_train=False)


def decode_image(data: bytes) -> Image.Image:
    """An RGB image from JPEG, PNG or WebP bytes; never more than MAX_IMAGE_PIXELS pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise SkipSample(Reason.IMAGE_TOO_LARGE, str(error)) from None
    except Image.UnidentifiedImageError as error:
        raise SkipSample(Reason.NOT_AN_IMAGE, str(error)) from None
    except Exception as error:  # noqa: BLE001 - a damaged header can raise anything from a plugin
        raise SkipSample(Reason.CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise SkipSample(Reason.IMAGE_TOO_LARGE, f"{width}x{height}")
    try:
        image.load()
        if image.mode.startswith("I"):
            # 16-bit grayscale PNG: keep the top 8 bits (converting clips everything over 255 to white).
            image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8), "L")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - truncated or corrupt pixel data
        raise SkipSample(Reason.CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from None


def _unusable_image(image: Image.Image, corpus: CorpusConfig) -> str | None:
    """Why a decoded image is left out (`small_image`, `extreme_aspect_ratio`), or None."""
    short, long = sorted(image.size)
    if short < corpus.min_image_size:
        return Reason.SMALL_IMAGE
    if long > MAX_ASPECT_RATIO * short:
        return Reason.EXTREME_ASPECT_RATIO
    return None


def load_json(data: bytes) -> object:
    """The parsed JSON; bytes that are not UTF-8, and JSON that does not parse or nests too deep for
    the parser, skip the sample."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as error:
        raise SkipSample(Reason.INVALID_UTF8, str(error)) from None
    except (ValueError, RecursionError) as error:
        raise SkipSample(Reason.INVALID_JSON, f"{type(error).__name__}: {error}") from None


def check_unicode(text: str) -> str:
    """`text`, if UTF-8 can hold it: a JSON escape such as "\\ud800" gives a lone surrogate, which
    neither UTF-8 nor the tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SkipSample(Reason.INVALID_UTF8, str(error)) from None
    return text


def _text(data: bytes | None) -> str:
    if data is None:
        raise SkipSample(Reason.MISSING_TEXT)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SkipSample(Reason.INVALID_UTF8, str(error)) from None
    if not text.strip():
        raise SkipSample(Reason.EMPTY_TEXT)
    return text


def decode_text(sample: RawSample, corpus: CorpusConfig) -> Document:
    return Document([_text(sample.members.get("txt"))])


def decode_caption(sample: RawSample, corpus: CorpusConfig) -> Document:
    caption = _text(sample.members.get("txt")).strip()
    data = next((sample.members[ext] for ext in IMAGE_EXTENSIONS if ext in sample.members), None)
    if data is None:
        raise SkipSample(Reason.MISSING_IMAGE)
    image = decode_image(data)
    reason = _unusable_image(image, corpus)
    if reason is not None:
        raise SkipSample(reason, f"{image.size[0]}x{image.size[1]}")
    return Document([image, caption])


def decode_interleaved(sample: RawSample, corpus: CorpusConfig) -> Document:
    """`{"texts": [...], "images": [...]}`: at each position one list holds a string, the other null.

    An image entry names the sample's member holding it (its suffix, e.g. `"2.jpg"`).
    """
    if "json" not in sample.members:
        raise SkipSample(Reason.INVALID_JSON, "no .json member")
    layout = load_json(sample.members["json"])
    if not isinstance(layout, dict) or not all(isinstance(layout.get(k), list) for k in ("texts", "images")):
        raise SkipSample(Reason.INVALID_JSON, 'expected {"texts": [...], "images": [...]}')
    texts, images = layout["texts"], layout["images"]
    if len(texts) != len(images):
        raise SkipSample(Reason.MISMATCHED_LISTS, f"{len(texts)} texts, {len(images)} images")
    document = Document([])
    kept_images = 0
    for text, image_name in zip(texts, images):
        if (text is None) == (image_name is None):
            raise SkipSample(Reason.MISMATCHED_LISTS, "a position needs exactly one of text and image")
        if text is not None:
            if not isinstance(text, str):
                raise SkipSample(Reason.INVALID_JSON, f"text entry {text!r} is not a string")
            document.parts.append(check_unicode(text))
            continue
        if not isinstance(image_name, str) or image_name.lower() not in sample.members:
            raise SkipSample(Reason.MISSING_IMAGE, f"{image_name!r} is not a member of {sample.key}")
        if image_name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
            raise SkipSample(Reason.MISSING_IMAGE, f"{image_name!r} is not an image member")
        if kept_images == corpus.max_images:
            document.dropped_images[Reason.OVER_MAX_IMAGES] += 1
            continue
        image = decode_image(sample.members[image_name.lower()])
        reason = _unusable_image(image, corpus)
        if reason is not None:
            document.dropped_images[reason] += 1
            continue
        document.parts.append(image)
        kept_images += 1
    if not any(isinstance(p, str) and p.strip() for p in document.parts):
        raise SkipSample(Reason.EMPTY_TEXT, "no text in the document")
    return document


def instruction_parts(instruction: str, input: str, output: str) -> Document:
    """The layout of an (instruction, input, output) triple; only the output (and `</s>`) is learned.

    `Instruction: ... Input: ... Output: ...`, the input line left out when it is empty.
    """
    parts = [f"Instruction: {instruction.strip()}"]
    if input.strip():
        parts.append(f"Input: {input.strip()}")
    parts += ["Output:", output.strip()]
    return Document(parts, learn=[False] * (len(parts) - 1) + [True])


def decode_instruction(sample: RawSample, corpus: CorpusConfig) -> Document:
    """`{"instruction": ..., "input": ..., "output": ...}` (input optional), for instruction tuning;
    or a prompt already laid out as an interleaved document, `{"texts": [...], "images": [...],
    "output": ...}` (multimodal fine-tuning such as ScienceQA), read as it is, then the output."""
    if "json" not in sample.members:
        raise SkipSample(Reason.INVALID_JSON, "no .json member")
    triple = load_json(sample.members["json"])
    if not isinstance(triple, dict):
        raise SkipSample(Reason.INVALID_JSON, 'expected {"instruction": ..., "input": ..., "output": ...}')
    if "texts" in triple or "images" in triple:
        return _interleaved_prompt(sample, corpus, triple.get("output"))
    fields = {
        "instruction": triple.get("instruction"),
        "input": triple.get("input", ""),
        "output": triple.get("output"),
    }
    if not all(isinstance(value, str) for value in fields.values()):
        raise SkipSample(Reason.INVALID_JSON, "instruction, input and output must be strings")
    for value in fields.values():
        check_unicode(value)
    if not fields["instruction"].strip() or not fields["output"].strip():
        raise SkipSample(Reason.EMPTY_TEXT, "an instruction or output is empty")
    return instruction_parts(**fields)


def _interleaved_prompt(sample: RawSample, corpus: CorpusConfig, output: object) -> Document:
    if not isinstance(output, str):
        raise SkipSample(Reason.INVALID_JSON, "the output must be a string")
    if not output.strip():
        raise SkipSample(Reason.EMPTY_TEXT, "the output is empty")
    check_unicode(output)
    document = decode_interleaved(sample, corpus)
    document.parts.append(output.strip())
    document.learn = [False] * (len(document.parts) - 1) + [True]
    return document


DECODERS: dict[str, Callable[[RawSample, CorpusConfig], Document]] = {
    "text": decode_text,
    "caption": decode_caption,
    "interleaved": decode_interleaved,
    "instruction": decode_instruction,
}
# Kinds whose documents may continue from one packed row into the next (never inside an image).
# A caption pair stays whole so that its caption is always read beside its image.
SPLITTABLE_KINDS = ("text", "interleaved")
