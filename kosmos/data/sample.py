"""The embedded sample corpus: real text and images that installed packages ship, built in seconds.

- text: Python's own documentation topics (`pydoc_data`) and scikit-learn's dataset descriptions.
- caption: scikit-learn's handwritten digits (8x8, stored upscaled to 64x64) with captions made from
  their labels, and scikit-image's photographs with captions from what their documentation says
  each one shows.
- interleaved: documents mixing them (digit sequences, digit questions and answers, photographs with
  their documentation's description).
- eval: digits kept out of all training corpora, as captioning, VQA and classification sets.
- scienceqa: questions about digits in the ScienceQA release layout, with lectures and worked
  solutions, for multimodal chain-of-thought fine-tuning (train on training digits; val and test on
  held-out ones).
- tokenizer.model: a 4000-piece SentencePiece model trained on the corpus text (vocabulary 4007).

Everything is deterministic: the same packages give byte-identical shards and tokenizer.
"""

from __future__ import annotations

import inspect
import io
import json
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from kosmos.config import ConfigError
from kosmos.data.shards import CorpusWriter
from kosmos.tokenizer import Tokenizer
from kosmos.tokenizer.training import sentences, train_sentencepiece

TOKENIZER_PIECES = 4000
DIGIT_SIZE = 64  # 8x8 digits upscaled (nearest) so that the 64x64 minimum keeps them
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EVAL_TEST_PER_CLASS = 20
EVAL_DEMO_PER_CLASS = 5
INTERLEAVED_DOCUMENTS = 480
SHARDS_PER_CORPUS = 4
VQA_QUESTION = "What digit is this?"

DIGIT_CAPTIONS = (
    "An image of the handwritten digit {digit}.",
    "A handwritten {word}.",
    "The digit {digit}, written by hand.",
    "A small grayscale scan of the number {word}.",
    "The photo of the digit {word}.",
    "A hand-drawn {digit} in dark ink on a light background.",
)
# What scikit-image's documentation says each bundled picture shows (only those in the wheel).
PHOTOS = {
    "astronaut": "the astronaut Eileen Collins",
    "brick": "a brick wall",
    "camera": "a man with a camera on a tripod",
    "chelsea": "Chelsea the cat",
    "cell": "a cell floating in saline",
    "checkerboard": "a checkerboard",
    "clock": "a motion blurred wall clock",
    "coffee": "a coffee cup",
    "coins": "Greek coins from Pompeii",
    "colorwheel": "a color wheel",
    "grass": "grass",
    "gravel": "gravel",
    "horse": "a black and white silhouette of a horse",
    "hubble_deep_field": "the Hubble eXtreme Deep Field",
    "immunohistochemistry": "colonic glands with immunohistochemical staining",
    "logo": "the scikit-image logo",
    "microaneurysms": "a detail of the retina",
    "moon": "the surface of the moon",
    "page": "a scanned page of printed text",
    "retina": "a human retina",
    "rocket": "the launch of DSCOVR on a Falcon 9 rocket",
    "text": "gray-level text",
}
PHOTO_CAPTIONS = ("An image of {what}.", "A photo of {what}.", "This picture shows {what}.")
PHOTO_MAX_SIDE = 256


def text_documents() -> list[str]:
    import pydoc_data.topics

    import sklearn.datasets

    topics = pydoc_data.topics.topics
    descr = Path(sklearn.datasets.__file__).parent / "descr"
    return [topics[name] for name in sorted(topics)] + [p.read_text() for p in sorted(descr.glob("*.rst"))]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def digit_images() -> tuple[list[bytes], list[int]]:
    """scikit-learn's 1797 digits as 64x64 PNGs, dark ink on a light background, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images:  # values 0 (blank) .. 16 (ink)
        gray = np.round(255 - pixels * (255 / 16)).astype(np.uint8)
        images.append(png(Image.fromarray(gray, "L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.NEAREST)))
    return images, [int(t) for t in digits.target]


def photo(name: str) -> Image.Image:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    image = Image.fromarray(pixels)
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    image = image.convert("RGB")
    image.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.BICUBIC)
    return image


def photo_description(name: str) -> str:
    """The descriptive paragraphs of the picture's docstring (no notes, links or licence)."""
    import skimage.data

    doc = inspect.getdoc(getattr(skimage.data, name)) or ""
    for header in ("Notes", "Returns", "References", "Parameters"):
        doc = doc.split(f"\n{header}\n")[0]
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
    keep = [p for p in paragraphs if p and not any(w in p.lower() for w in ("http", "copyright", "cc0"))]
    return "\n\n".join(keep)


def split_digits(labels: list[int]) -> dict[str, list[int]]:
    """Digit indices for training, and held-out ones for evaluation (test) and its demonstrations."""
    rng = random.Random(0)
    split = {"train": [], "test": [], "demo": []}
    for digit in range(10):
        members = [i for i, label in enumerate(labels) if label == digit]
        rng.shuffle(members)
        test, demo = EVAL_TEST_PER_CLASS, EVAL_DEMO_PER_CLASS
        split["test"] += members[:test]
        split["demo"] += members[test : test + demo]
        split["train"] += members[test + demo :]
    return {name: sorted(indices) for name, indices in split.items()}


def digit_caption(rng: random.Random, digit: int) -> str:
    return rng.choice(DIGIT_CAPTIONS).format(digit=digit, word=NUMBER_WORDS[digit])


def build_sample(out: str | Path) -> dict[str, int]:
    """Write the sample corpus into `out` (which must be absent or empty); returns sample counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty")
    rng = random.Random(1234)
    texts = text_documents()
    digits, labels = digit_images()
    split = split_digits(labels)
    photos = {name: jpeg(photo(name)) for name in PHOTOS}
    descriptions = {name: photo_description(name) for name in PHOTOS}
    tokenizer_text = list(texts)

    def per_shard(count: int) -> int:
        return -(-count // SHARDS_PER_CORPUS)

    with CorpusWriter(out / "text", "text", samples_per_shard=per_shard(len(texts))) as writer:
        for text in texts:
            writer.write({"txt": text.encode()})

    pairs = [(digits[i], digit_caption(rng, labels[i]), "png") for i in split["train"]]
    pairs += [
        (photos[name], template.format(what=what), "jpg")
        for name, what in PHOTOS.items()
        for template in PHOTO_CAPTIONS
    ]
    rng.shuffle(pairs)
    with CorpusWriter(out / "caption", "caption", samples_per_shard=per_shard(len(pairs))) as writer:
        for image, caption, ext in pairs:
            writer.write({ext: image, "txt": caption.encode()})
            tokenizer_text.append(caption)

    documents = [
        interleaved_document(rng, digits, labels, split["train"], photos, descriptions)
        for _ in range(INTERLEAVED_DOCUMENTS)
    ]
    with CorpusWriter(
        out / "interleaved", "interleaved", samples_per_shard=per_shard(len(documents))
    ) as writer:
        for layout, images in documents:
            writer.write({"json": json.dumps(layout).encode(), **images})
            tokenizer_text += [t for t in layout["texts"] if t is not None]

    write_eval_sets(out / "eval", digits, labels, split)
    problems = write_scienceqa_digits(out / "scienceqa", digits, labels, split)

    train_tokenizer(tokenizer_text, out / "tokenizer.model", TOKENIZER_PIECES)
    return {
        "text": len(texts),
        "caption": len(pairs),
        "interleaved": len(documents),
        "eval": len(split["test"]),
        "scienceqa": problems,
    }


def train_tokenizer(texts: Iterable[str], out: Path, pieces: int) -> Tokenizer:
    """The sample's tokenizer settings (the tests' tokenizers use them too). Its text is English prose,
    code and captions: a character coverage of 0.9995 leaves its few rare characters to `<unk>` rather
    than spending pieces on them. A fixed thread count keeps the model byte-identical across machines."""
    lines = (sentence for text in texts for sentence in sentences(text))
    return train_sentencepiece(lines, out, pieces, character_coverage=0.9995, threads=2)


def interleaved_document(
    rng: random.Random,
    digits: list[bytes],
    labels: list[int],
    train: list[int],
    photos: dict[str, bytes],
    descriptions: dict[str, str],
) -> tuple[dict, dict[str, bytes]]:
    """One document: `{"texts", "images"}` and its image members (named by list position)."""
    parts: list[tuple[str, str | bytes]] = []  # ("text", str) or ("png"/"jpg", bytes)
    style = rng.choice(("sequence", "questions", "photos"))
    if style == "sequence":
        chosen = rng.sample(train, rng.randint(2, 5))
        parts.append(
            ("text", rng.choice(("Here are some handwritten digits.", "A row of digits, written by hand.")))
        )
        for i in chosen:
            word = NUMBER_WORDS[labels[i]]
            parts += [
                ("png", digits[i]),
                ("text", rng.choice((f"This is a {word}.", f"Next comes {labels[i]}."))),
            ]
        parts.append(("text", f"Read together they make {''.join(str(labels[i]) for i in chosen)}."))
    elif style == "questions":
        for i in rng.sample(train, rng.randint(1, 4)):
            parts += [("png", digits[i]), ("text", f"Question: {VQA_QUESTION} Answer: {labels[i]}.")]
    else:
        for name in rng.sample(sorted(photos), rng.randint(1, 3)):
            parts += [("text", f"{PHOTOS[name][0].upper()}{PHOTOS[name][1:]}."), ("jpg", photos[name])]
            parts.append(("text", descriptions[name]))
    layout = {"texts": [], "images": []}
    members = {}
    for position, (kind, value) in enumerate(parts):
        if kind == "text":
            layout["texts"].append(value)
            layout["images"].append(None)
        else:
            name = f"{position}.{kind}"
            layout["texts"].append(None)
            layout["images"].append(name)
            members[name] = value
    return layout, members


def write_eval_sets(
    folder: Path, digits: list[bytes], labels: list[int], split: dict[str, list[int]]
) -> None:
    """Held-out digits as JSON-lines sets; each line has `split`: "test", or "demo" (few-shot pool)."""
    (folder / "images").mkdir(parents=True)
    captioning, vqa, classification = [], [], []
    for split_name in ("test", "demo"):
        for i in split[split_name]:
            image = f"images/digit-{i:04d}.png"
            (folder / image).write_bytes(digits[i])
            digit, word = labels[i], NUMBER_WORDS[labels[i]]
            common = {"id": f"digit-{i:04d}", "split": split_name, "image": image}
            refs = [template.format(digit=digit, word=word) for template in DIGIT_CAPTIONS]
            captioning.append({**common, "captions": refs})
            vqa.append({**common, "question": VQA_QUESTION, "answers": [str(digit)] * 10})
            classification.append({**common, "label": digit, "class_name": word})
    for name, rows in (("captioning", captioning), ("vqa", vqa), ("classification", classification)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "classes.json").write_text(json.dumps(list(NUMBER_WORDS)) + "\n")


# --- ScienceQA-format digit problems ------------------------------------------------------------------

SCIENCEQA_PROBLEMS = {"train": 600, "val": 50, "test": 100}  # train on training digits, val/test held out
SCIENCEQA_DIGITS = {"train": "train", "val": "demo", "test": "test"}
# In turn, so every split holds every kind; reading the digit comes twice as often.
SCIENCEQA_KINDS = ("read", "read", "parity", "word", "add", "place", "compare")
IMAGE_KINDS = ("read", "parity", "word", "add")
ORDINALS = ("first", "second", "third")
LECTURES = {
    "read": "Each digit has its own shape: a 0 is a closed loop and a 1 is a single stroke.",
    "parity": "The even digits are 0, 2, 4, 6 and 8; the odd digits are 1, 3, 5, 7 and 9.",
    "word": "Each digit has a name, from zero to nine.",
    "add": "To add two numbers, start at one of them and count on by the other.",
    "place": "In a two-digit number, the left digit is the tens and the right digit the ones.",
    "compare": "The larger of two numbers comes later when you count.",
}


def _choices(rng: random.Random, right: str, wrong: list[str], count: int) -> tuple[list[str], int]:
    """`count` options in a random order: the right one and distinct wrong ones."""
    options = [right, *rng.sample(sorted(set(wrong) - {right}), count - 1)]
    rng.shuffle(options)
    return options, options.index(right)


def digit_problem(rng: random.Random, kind: str, digit: int | None) -> dict:
    """One problem of `kind` (about the shown `digit` where the kind has an image) in the fields of
    ScienceQA's problems.json, less the split and the image.

    The worked solution ends by naming the right option and its place ("So 7 is right: it is the third
    option."), so that even the tiny model learns within minutes to take its answer from a rationale.
    """
    word = NUMBER_WORDS[digit] if digit is not None else None
    numbers = [str(n) for n in range(10)]
    hint = ""
    if kind == "read":
        subject, question = "natural science", "Which digit is shown in the image?"
        choices, answer = _choices(rng, str(digit), numbers, 3)
        steps = f"The image shows a handwritten {word}."
    elif kind == "parity":
        subject, question = "natural science", "Is the digit in the image even or odd?"
        parity = "even" if digit % 2 == 0 else "odd"
        choices, answer = _choices(rng, parity, ["even", "odd"], 2)
        steps = f"The image shows the digit {digit}, and {digit} is {parity}."
    elif kind == "word":
        subject, question = "language science", "Which word names the digit in the image?"
        hint = "The picture shows one handwritten digit."
        choices, answer = _choices(rng, word, list(NUMBER_WORDS), 3)
        steps = f"The image shows the digit {digit}, and the word for {digit} is {word}."
    elif kind == "add":
        subject, question = "natural science", "What is the sum?"
        k = rng.randint(1, 5)
        hint = f"Add {k} to the digit in the picture."
        choices, answer = _choices(rng, str(digit + k), [str(n) for n in range(1, 15)], 3)
        steps = f"The image shows the digit {digit}, and {digit} plus {k} is {digit + k}."
    elif kind == "place":
        subject, question = "social science", "Which digit is in the tens place of the price?"
        tens, ones = rng.randint(1, 9), rng.randint(0, 9)
        hint = f"A price tag in a shop window reads {tens}{ones} dollars."
        choices, answer = _choices(rng, str(tens), numbers, 3)
        steps = f"The price {tens}{ones} is {tens} tens and {ones} ones."
    else:
        subject = "social science"
        mia, leo = rng.sample(range(1, 20), 2)
        question = f"Mia has {mia} coins and Leo has {leo} coins. Who has more coins?"
        choices, answer = _choices(rng, "Mia" if mia > leo else "Leo", ["Mia", "Leo"], 2)
        steps = f"{max(mia, leo)} is larger than {min(mia, leo)}."
    return {
        "question": question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "task": "closed choice",
        "grade": f"grade{rng.randint(1, 8)}",
        "subject": subject,
        "topic": "digits",
        "category": kind,
        "skill": kind,
        "lecture": LECTURES[kind],
        "solution": f"{steps} So {choices[answer]} is right: it is the {ORDINALS[answer]} option.",
    }


def write_scienceqa_digits(
    folder: Path, digits: list[bytes], labels: list[int], split: dict[str, list[int]]
) -> int:
    """Digit problems in the ScienceQA release layout; returns how many.

    Image problems (reading, parity, number words, sums) show one digit; the others (place value
    from a text context, comparisons with none) have no image, as ScienceQA mixes both.
    """
    rng = random.Random(77)  # its own generator: the corpora above stay as they were
    folder.mkdir(parents=True)
    problems, pid_splits = {}, {}
    for split_name, count in SCIENCEQA_PROBLEMS.items():
        pool = split[SCIENCEQA_DIGITS[split_name]]
        pid_splits[split_name] = []
        for _ in range(count):
            pid = str(len(problems) + 1)
            kind = SCIENCEQA_KINDS[len(problems) % len(SCIENCEQA_KINDS)]
            index = rng.choice(pool) if kind in IMAGE_KINDS else None
            problem = digit_problem(rng, kind, None if index is None else labels[index])
            problem.update(image="image.png" if index is not None else None, split=split_name)
            if index is not None:
                (folder / "images" / split_name / pid).mkdir(parents=True)
                (folder / "images" / split_name / pid / "image.png").write_bytes(digits[index])
            problems[pid] = problem
            pid_splits[split_name].append(pid)
    (folder / "problems.json").write_text(json.dumps(problems, indent=1) + "\n")
    (folder / "pid_splits.json").write_text(json.dumps(pid_splits) + "\n")
    return len(problems)
