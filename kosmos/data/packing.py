"""Packing documents into rows of `seq_len` positions, and rows into batches (docs/design.md,
"The batch contract").

A row holds whole documents in reading order. When the next document does not fit in what is left
of a row, a splittable one (text, interleaved) fills the rest and continues in the next row, cut
anywhere but inside an image block; a caption pair, never cut, starts the next row instead. Every
piece is its own segment: positions restart at 0, attention stays inside it, and its last token has
no target. So text rows are always full, and other rows end with less than one document of padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kosmos.data.batch import Batch
from kosmos.data.state import CorpusState
from kosmos.data.stream import CorpusStream, EncodedDocument, SampleRef
from kosmos.tokenizer import IGNORE_INDEX, PAD


@dataclass
class Segment:
    document: EncodedDocument
    start: int
    end: int


Row = list[Segment]


class RowPacker:
    """Fills rows with one corpus's documents; the document left over at the end carries on."""

    def __init__(self, stream: CorpusStream, seq_len: int, splittable: bool):
        self.stream = stream
        self.seq_len = seq_len
        self.splittable = splittable
        self.pending: EncodedDocument | None = None
        self.offset = 0  # tokens of `pending` already packed

    def pack(self, num_rows: int) -> tuple[list[Row], list[SampleRef]]:
        """`num_rows` rows, and the documents whose first token went into them."""
        rows: list[Row] = []
        started: list[SampleRef] = []
        row: Row = []
        free = self.seq_len
        while len(rows) < num_rows:
            if self.pending is None:
                self.pending, self.offset = self.stream.next_document()
            document, start = self.pending, self.offset
            end = len(document) if len(document) - start <= free else self._cut(document, start, free)
            if end is not None:
                if start == 0:
                    started.append(document.ref)
                row.append(Segment(document, start, end))
                free -= end - start
                if end == len(document):
                    self.pending = None
                else:
                    self.offset = end
            if end is None or free == 0:
                assert row, "a document piece must fit in an empty row"
                rows.append(row)
                row, free = [], self.seq_len
        return rows, started

    def _cut(self, document: EncodedDocument, start: int, free: int) -> int | None:
        """The furthest end in (start, start + free] that leaves every image block whole."""
        if not self.splittable:
            return None
        mask = document.image_mask
        for end in range(start + free, start, -1):
            if not (mask[end] or mask[end - 1]):
                return end
        return None

    def state(self) -> CorpusState:
        return self.stream.state(unread=self.pending, offset=self.offset if self.pending else 0)

    def restore(self, state: CorpusState) -> None:
        self.stream.restore(state)
        self.pending, self.offset = None, 0


def collate(rows: list[Row], corpora: list[str], seq_len: int, image_size: int) -> Batch:
    """The batch of docs/design.md ("The batch contract") for these rows, `corpora` the corpus of each."""
    batch = len(rows)
    input_ids = torch.full((batch, seq_len), PAD, dtype=torch.long)
    image_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    segment_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    images = [torch.empty(0, 3, image_size, image_size)]
    for b, row in enumerate(rows):
        t = 0
        for number, segment in enumerate(row, start=1):
            document, start, end = segment.document, segment.start, segment.end
            span = slice(t, t + end - start)
            input_ids[b, span] = document.ids[start:end]
            image_mask[b, span] = document.image_mask[start:end]
            labels[b, span] = document.labels[start:end]
            labels[b, span.stop - 1] = IGNORE_INDEX  # its target, if any, lies in the next piece
            position_ids[b, span] = torch.arange(end - start)
            segment_ids[b, span] = number
            images.append(document.images_between(start, end))
            t = span.stop
    return Batch(
        input_ids=input_ids,
        image_mask=image_mask,
        position_ids=position_ids,
        segment_ids=segment_ids,
        images=torch.cat(images),
        labels=labels,
        corpora=tuple(corpora),
    )
