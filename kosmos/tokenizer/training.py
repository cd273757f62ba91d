"""Training the SentencePiece model of a tokenizer from corpora (`kosmos tokenizer train`).

Sentences are the lines of every text part of every document (text documents, captions, the texts of
interleaved documents), read through `kosmos.data.texts`. A uniform sample of at most
`max_sentences` of them is kept while reading (reservoir sampling), so memory is bounded by the
sample, not by the corpus; SentencePiece then trains on the whole sample.

Settings, for the paper's 64k tokenizer (vocabulary 64,007 in the fairseq layout):
- model type `unigram`, SentencePiece's default (`bpe` on request);
- `<unk>`=0, `<s>`=1, `</s>`=2 and no padding piece: the XLM-R layout that `Tokenizer` shifts into
  the fairseq one, and the one `transformers`' XLM-R tokenizer reads back on export;
- character coverage 0.9999: web text holds many scripts, and a character outside the covered set
  is read as `<unk>`;
- no byte fallback by default: with it, characters outside the coverage become byte pieces instead
  of `<unk>`, but 256 of the pieces are spent on bytes, and `transformers`' XLM-R tokenizer (the
  export's, and Kosmos-2's) has no byte pieces;
- SentencePiece's default `nmt_nfkc` normalisation and whitespace handling, which the exported
  `transformers` tokenizer reproduces.

This is the one place SentencePiece is trained: `kosmos tokenizer train`, the sample corpus's tokenizer
(`kosmos.data.sample`) and the tests' all come through `train_sentencepiece`.

A text too small for the size asked for (the sample corpus supports about 5,760 pieces) can still give a
tokenizer of that size with `placeholders`: SentencePiece learns the pieces the text supports, and the
rest of the vocabulary is filled with placeholder pieces of SentencePiece's `UNUSED` type, which
encoding never produces. The ids are then laid out as a real tokenizer of that size would lay them out,
which is what trying a paper-sized config end to end (`kosmos train --dry-run`) needs.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from kosmos.threads import available_cores
from kosmos.tokenizer import SENTENCEPIECE_LAYOUT, Tokenizer, TokenizerError

# SentencePiece drops longer sentences (its `max_sentence_length`, in bytes); longer lines are cut
# at spaces to fit.
MAX_SENTENCE_BYTES = 4192


def sentences(text: str) -> Iterator[str]:
    """The non-empty lines of `text`, each cut at spaces into pieces of at most MAX_SENTENCE_BYTES."""
    for line in text.splitlines():
        line = line.strip()
        if len(line.encode()) <= MAX_SENTENCE_BYTES:
            if line:
                yield line
            continue
        piece: list[str] = []
        size = 0
        for word in line.split():
            word_bytes = len(word.encode())
            if piece and size + 1 + word_bytes > MAX_SENTENCE_BYTES:
                yield " ".join(piece)
                piece, size = [], 0
            if word_bytes <= MAX_SENTENCE_BYTES:  # a single longer "word" is not text worth learning
                piece.append(word)
                size += word_bytes + (size > 0)
        if piece:
            yield " ".join(piece)


class SentenceSample:
    """A uniform sample of at most `limit` sentences of a stream of unknown length (Algorithm R)."""

    def __init__(self, limit: int, seed: int = 0):
        if limit < 1:
            raise ValueError("the sentence sample needs a limit of at least 1")
        self.limit = limit
        self.seen = 0
        self.sentences: list[str] = []
        self._rng = random.Random(seed)

    def add(self, sentence: str) -> None:
        self.seen += 1
        if len(self.sentences) < self.limit:
            self.sentences.append(sentence)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.limit:
            self.sentences[slot] = sentence


@dataclass
class TrainingReport:
    documents: dict[str, int] = field(default_factory=dict)  # read, per corpus folder
    skipped: dict[str, int] = field(default_factory=dict)  # unusable samples, by reason
    sentences_seen: int = 0
    sentences_used: int = 0


def sample_sentences(
    folders: Iterable[str | Path], max_sentences: int, max_documents: int | None, seed: int
) -> tuple[list[str], TrainingReport]:
    """A uniform sample of the sentences of the corpora (`max_documents` per corpus at most)."""
    from kosmos.data.skips import Counts, saved
    from kosmos.data.texts import corpus_texts

    sample = SentenceSample(max_sentences, seed)
    report = TrainingReport()
    skipped: Counts = Counter()
    for folder in folders:
        documents = 0
        # Reading a large corpus takes minutes: a bar where a terminal watches.
        read = tqdm(corpus_texts(folder, skipped, max_documents, seed), unit="doc", desc=f"reading {folder}", disable=None)
        for texts in read:
            documents += 1
            for text in texts:
                for sentence in sentences(text):
                    sample.add(sentence)
        report.documents[str(folder)] = documents
    report.skipped = saved(skipped)
    report.sentences_seen, report.sentences_used = sample.seen, len(sample.sentences)
    return sample.sentences, report


def train_sentencepiece(
    sentences: Iterable[str],
    out: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9999,
    byte_fallback: bool = False,
    threads: int | None = None,
    placeholders: bool = False,
) -> Tokenizer:
    """Train on the given sentences (all of them, in order) and write the model to `out`; with
    `placeholders`, pieces the text cannot support are placeholders (above)."""
    out = Path(out)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            hard_vocab_limit=not placeholders,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads or available_cores(),
            minloglevel=2,
            **SENTENCEPIECE_LAYOUT,
        )
    except RuntimeError as error:
        raise TokenizerError(f"SentencePiece could not train a {vocab_size}-piece model: {error}") from None
    data = with_placeholders(model.getvalue(), vocab_size) if placeholders else model.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_bytes(data)
    partial.rename(out)
    return Tokenizer(out)


PLACEHOLDER = "<placeholder_{}>"


def with_placeholders(model: bytes, pieces: int) -> bytes:
    """A serialized SentencePiece model with placeholder pieces appended up to `pieces` in all."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for i in range(pieces - len(proto.pieces)):
        proto.pieces.add(piece=PLACEHOLDER.format(i), score=0.0, type=unused)
    return proto.SerializeToString()


def placeholder_count(tokenizer: Tokenizer) -> int:
    """How many of the tokenizer's pieces are placeholders."""
    return sum(tokenizer.sp.is_unused(i) for i in range(tokenizer.num_pieces))


def model_settings(tokenizer: Tokenizer) -> dict[str, object]:
    """The training settings a SentencePiece model file records."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sp.serialized_model_proto())
    spec = proto.trainer_spec
    return {
        "model_type": sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type).lower(),
        "character_coverage": round(spec.character_coverage, 6),
        "byte_fallback": spec.byte_fallback,
        "normalization": proto.normalizer_spec.name,
    }
