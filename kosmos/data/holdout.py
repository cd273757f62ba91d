"""Held-out samples for validation: a share of a corpus chosen by a hash of each sample's shard and key.

A sample is held out when the SHA-256 of `<shard name>/<sample key>` falls below `share` of the hash
range: which samples these are depends on nothing but the corpus, so it is the same on every world
size, worker count, seed and epoch. Training streams skip them (counted as `held_out`, on purpose, and
left out of the skip-fraction rule); the validation set reads only them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kosmos.data.skips import Reason


class EpochEnd(Exception):
    """The validation stream has read its corpus once."""


def is_held_out(shard: str, key: str, share: float) -> bool:
    digest = hashlib.sha256(f"{shard}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


@dataclass(frozen=True)
class Holdout:
    """Which samples a stream serves: the held-out `share` (validation, one epoch) or the rest (training)."""

    share: float
    validation: bool

    def skip_reason(self, shard: str, key: str, epoch: int) -> str | None:
        """Why the stream passes over this sample, or None when it serves it."""
        if self.validation and epoch > 0:
            raise EpochEnd
        if is_held_out(shard, key, self.share) == self.validation:
            return None
        return Reason.NOT_HELD_OUT if self.validation else Reason.HELD_OUT
