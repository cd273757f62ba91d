"""The validation loss: the model's mean next-token loss on a fixed held-out set (`data.validation`).

The set is read once, when training starts, from each validation corpus (the training corpora's
held-out share, or corpora of their own) in its epoch-0 order with a single stream: `validation.rows`
packed rows per corpus, or every held-out sample if there are fewer. Row i of a corpus goes to rank
i % world_size, so all ranks together measure the same rows whatever the world size, and the
per-corpus sums are all-reduced.

A validation pass leaves training as it was: the model runs in eval mode without gradients, the
random-number generators are restored afterwards, and the training loader is not touched.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from kosmos.config import ConfigError
from kosmos.data.batch import Batch
from kosmos.data.config import DataConfig
from kosmos.data.decode import SPLITTABLE_KINDS
from kosmos.data.holdout import EpochEnd, Holdout
from kosmos.data.loader import corpus_reader
from kosmos.data.packing import Row, RowPacker, collate
from kosmos.data.shards import read_index
from kosmos.tokenizer import IGNORE_INDEX, Tokenizer
from kosmos.train.state import rng_state, set_rng_state


class ValidationSet:
    """This rank's share of the held-out rows, as micro-batches, and the loss of a model on them."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        image_size: int,
        num_image_tokens: int,
        rank: int,
        world_size: int,
    ):
        self.cfg = cfg
        self.corpora = cfg.validation.corpora or cfg.corpora
        self.names = [corpus.name for corpus in self.corpora]
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.rank = rank
        self.world_size = world_size
        self.rows: dict[str, int] = {}  # rows of each corpus over all ranks
        # (micro-batch, counted): a rank with fewer rows than rank 0 repeats a pass whose result is
        # dropped, so that every rank runs as many forward passes (ZeRO-3 gathers weights in each).
        self.passes = self._build()

    def _read_rows(self, corpus) -> list[Row]:
        wanted = self.cfg.validation.rows
        holdout = Holdout(self.cfg.validation.holdout or 1.0, validation=True)
        rows: list[Row] = []
        with corpus_reader(
            self.cfg,
            corpus,
            read_index(corpus.path),
            self.tokenizer,
            self.image_size,
            self.num_image_tokens,
            holdout=holdout,
        ) as stream:
            packer = RowPacker(stream, self.cfg.seq_len, splittable=corpus.kind in SPLITTABLE_KINDS)
            try:
                while len(rows) < wanted:
                    rows += packer.pack(1)[0]
            except EpochEnd:  # every held-out sample read; the row being filled is left out
                pass
        return rows

    def _build(self) -> list[tuple[Batch, bool]]:
        size = self.cfg.micro_batch_size
        mine: list[Batch] = []
        most = 0  # rank 0's passes: it holds the most rows of every corpus
        filler = None
        for corpus in self.corpora:
            rows = self._read_rows(corpus)
            self.rows[corpus.name] = len(rows)
            most += math.ceil(math.ceil(len(rows) / self.world_size) / size)
            if filler is None and rows:
                filler = collate(rows[:1], [corpus.name], self.cfg.seq_len, self.image_size)
            own = rows[self.rank :: self.world_size]
            for i in range(0, len(own), size):
                batch = own[i : i + size]
                mine.append(collate(batch, [corpus.name] * len(batch), self.cfg.seq_len, self.image_size))
        if filler is None:
            raise ConfigError(f"data.validation: no held-out sample in {', '.join(self.names)}")
        extra = [(mine[0] if mine else filler, False)] * (most - len(mine))
        return [(batch, True) for batch in mine] + extra

    def loss(self, engine, device: torch.device) -> dict:
        """`val_loss` overall and `val_loss_<corpus>` of the engine's model on the set, over all ranks,
        with the labelled tokens it counted and the seconds the pass took (reading the set excluded)."""
        saved = rng_state()
        started = time.perf_counter()
        sums = torch.zeros(len(self.names), 2, dtype=torch.float64, device=device)
        engine.eval()
        try:
            with torch.no_grad():
                for batch, counted in self.passes:
                    on_device = batch.to(device, non_blocking=True)
                    token_loss = engine(**on_device.inputs()).token_loss
                    if counted:
                        row = self.names.index(batch.corpora[0])
                        sums[row, 0] += token_loss.double().sum()
                        sums[row, 1] += (on_device.labels != IGNORE_INDEX).sum()
        finally:
            engine.train()
            set_rng_state(saved)
        dist.all_reduce(sums)
        sums = sums.cpu()
        total = sums.sum(0)
        record: dict = {"val_loss": float(total[0] / total[1]) if total[1] else None}
        for name, (loss_sum, labelled) in zip(self.names, sums):
            record[f"val_loss_{name}"] = float(loss_sum / labelled) if labelled else None
        record["val_labelled_tokens"] = int(total[1])
        record["val_seconds"] = time.perf_counter() - started
        return record
