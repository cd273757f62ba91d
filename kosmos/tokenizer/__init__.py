"""SentencePiece tokenizer in the fairseq id layout, and the interleaved image-text sequence layout.

Ids: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, SentencePiece piece `p` (p >= 3) at `p + 1`, then
`<mask>`, `</doc>`, `<image>`, `</image>`, `</chunk>`, `</line>`. A 64k-piece model therefore has a
vocabulary of 64,007, and the ids equal those of the XLM-RoBERTa tokenizer `transformers` builds over
the same SentencePiece file. Special symbols are never produced from text: a literal "<image>" in a
document is tokenized like any other characters, and only `encode_interleaved` places image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIAL_SYMBOLS = ("<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>")
IGNORE_INDEX = -100
# SentencePiece's own ids that the fairseq layout is built on (XLM-R's): no padding piece.
SENTENCEPIECE_LAYOUT = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
# Image slots carry the ids `transformers`' Kosmos2Processor gives them (4, 5, ...); the model
# replaces their embeddings, so the ids only matter for matching that processor token for token.
FIRST_IMAGE_SLOT_ID = 4


class TokenizerError(ValueError):
    pass


def special_ids(vocab_size: int) -> dict[str, int]:
    """The ids of the special symbols in a vocabulary of `vocab_size` ids: its last ones, in order."""
    first = vocab_size - len(SPECIAL_SYMBOLS)
    return {name: first + i for i, name in enumerate(SPECIAL_SYMBOLS)}


@dataclass
class Encoded:
    """One sequence: token ids, which of them are image slots, and which are learned targets."""

    ids: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)
    learn: list[bool] = field(default_factory=list)
    num_images: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self) -> list[int]:
        """Shifted targets: labels[t] is the id to predict after reading position t, or -100.

        Nothing is learned at image slots, at `<image>` markers (their successor is a slot), for
        tokens marked not learned (prompts), nor after the last token.
        """
        out = [IGNORE_INDEX] * len(self.ids)
        for t in range(len(self.ids) - 1):
            if self.image_mask[t] or self.image_mask[t + 1]:
                continue
            if self.learn[t + 1]:
                out[t] = self.ids[t + 1]
        return out


class Tokenizer:
    bos_id = BOS
    pad_id = PAD
    eos_id = EOS
    unk_id = UNK

    def __init__(self, model_file: str | Path):
        path = Path(model_file)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"tokenizer model {path} is not a SentencePiece model: {error}") from None
        if (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (0, 1, 2):
            raise TokenizerError(
                f"tokenizer model {path} must have <unk>=0, <s>=1, </s>=2 (the XLM-R layout); "
                f"it has {self.sp.unk_id()}, {self.sp.bos_id()}, {self.sp.eos_id()}"
            )
        self.model_file = path
        self.num_pieces = self.sp.get_piece_size()
        self.vocab_size = self.num_pieces + 1 + len(SPECIAL_SYMBOLS)
        self.special_ids = special_ids(self.vocab_size)
        self.mask_id = self.special_ids["<mask>"]
        self.eod_id = self.special_ids["</doc>"]
        self.boi_id = self.special_ids["<image>"]
        self.eoi_id = self.special_ids["</image>"]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [UNK if p == 0 else p + 1 for p in self.sp.encode(text)]
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ordinary pieces; special symbols and image slots are left out."""
        pieces = [i - 1 for i in ids if 4 <= i <= self.num_pieces]
        return self.sp.decode(pieces)

    def piece(self, token_id: int) -> str:
        """The SentencePiece piece an ordinary id stands for, or the name of a special one."""
        if 4 <= token_id <= self.num_pieces:
            return self.sp.id_to_piece(token_id - 1)
        names = {BOS: "<s>", PAD: "<pad>", EOS: "</s>", UNK: "<unk>"}
        names |= {i: name for name, i in self.special_ids.items()}
        if token_id not in names:
            raise TokenizerError(f"id {token_id} is outside the vocabulary of {self.vocab_size}")
        return names[token_id]

    def image_slot_ids(self, num_image_tokens: int) -> list[int]:
        return list(range(FIRST_IMAGE_SLOT_ID, FIRST_IMAGE_SLOT_ID + num_image_tokens))

    def encode_interleaved(
        self,
        parts: Sequence[object],
        num_image_tokens: int,
        bos: bool = True,
        eos: bool = True,
        learn: Sequence[bool] | None = None,
    ) -> Encoded:
        """Lay out `<s> text <image> [slots] </image> text </s>` from parts in document order.

        A `str` part is text; any other part stands for one image (the caller keeps the images in the
        same order). `learn[i]` says whether part i's tokens are targets (False for the prompt side of
        instruction data); the closing `</s>` follows the last part.
        """
        if learn is not None and len(learn) != len(parts):
            raise TokenizerError(f"learn has {len(learn)} flags for {len(parts)} parts")
        out = Encoded()

        def add(ids: list[int], is_image: bool, learned: bool) -> None:
            out.ids.extend(ids)
            out.image_mask.extend([is_image] * len(ids))
            out.learn.extend([learned] * len(ids))

        if bos:
            add([BOS], False, False)
        slots = self.image_slot_ids(num_image_tokens)
        learned = True
        for i, part in enumerate(parts):
            learned = True if learn is None else bool(learn[i])
            if isinstance(part, str):
                add(self.encode(part), False, learned)
            else:
                add([self.boi_id], False, learned)
                add(slots, True, False)
                add([self.eoi_id], False, learned)
                out.num_images += 1
        if eos:
            add([EOS], False, learned)
        return out
