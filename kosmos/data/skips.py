"""Why a sample (or an image of a kept document) is left out: the reasons, named once, and their counts.

A reason is a plain string named by a `Reason` constant: counts keyed by reason are saved, logged and
shown under that spelling (`{"missing_image": 3}`), and counts read back from a saved state add up
with new ones. The builders count what they leave out in the index's `skipped`; the loader counts
what it skips as it reads, and `kosmos data inspect` counts the same way. Images left out of a kept
interleaved document are counted apart, as `dropped_images` (`small_image`, `extreme_aspect_ratio`,
`over_max_images`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping


class Reason:
    # -- the builders' --
    INVALID_CSV = "invalid_csv"  # a CSV/TSV row the csv module cannot read (e.g. an unclosed quote)
    HIDDEN_KEY = "hidden_key"  # a tar key group with a hidden name (`.KEY`, `__KEY__`)
    DUPLICATE_KEY = "duplicate_key"  # a tar key whose suffixes repeat: samples that cannot be told apart
    BAD_TAR_HEADER = "bad_tar_header"  # a stretch of a tar without a valid header, read past
    EMPTY_RATIONALE = "empty_rationale"  # a ScienceQA problem without the rationale its stage needs
    # -- a sample's content --
    MISSING_TEXT = "missing_text"  # no `.txt` member (text, caption)
    EMPTY_TEXT = "empty_text"  # only whitespace; an interleaved document without text
    INVALID_UTF8 = "invalid_utf8"  # not UTF-8, or a JSON string holding a lone surrogate ("\ud800")
    # An interleaved `.json` that does not parse (or nests too deep to) or is not
    # `{"texts": [...], "images": [...]}`; an instruction that is not strings.
    INVALID_JSON = "invalid_json"
    # `texts` and `images` differ in length, or a position has both or neither.
    MISMATCHED_LISTS = "mismatched_lists"
    MISSING_IMAGE = "missing_image"  # a caption without an image member; an image entry naming no member
    NOT_AN_IMAGE = "not_an_image"  # bytes under an image name that are not a JPEG, PNG or WebP image
    CORRUPT_IMAGE = "corrupt_image"  # an image that is truncated or fails to decode
    IMAGE_TOO_LARGE = "image_too_large"  # over MAX_IMAGE_PIXELS (decompression bombs are refused unread)
    SMALL_IMAGE = "small_image"  # an image whose short side is under `min_image_size`
    # An image whose long side is over MAX_ASPECT_RATIO times its short side: resizing the short side
    # would cost hundreds of MiB for a centre crop that shows a sliver of the image.
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
    OVER_MAX_IMAGES = "over_max_images"  # an image beyond the corpus's `max_images` (dropped, not skipped)
    OVERSIZED_MEMBER = "oversized_member"  # a member over MAX_MEMBER_BYTES, refused unread
    NO_TOKENS = "no_tokens"  # text that tokenizes to nothing
    TOO_LONG = "too_long"  # a caption pair or instruction over `seq_len` tokens (they are never cut)
    # -- a shard's --
    PATH_OUTSIDE = "path_outside"  # a shard name (or a builder's image path) leading out of its base
    UNREADABLE_SHARD = "unreadable_shard"  # a shard whose bytes cannot be had, or not a tar stream at all
    TRUNCATED_SHARD = "truncated_shard"  # a shard's samples after the point where its stream breaks off
    SHARD_SHORTER_THAN_INDEX = "shard_shorter_than_index"  # samples the index counts that the shard lacks
    SHARD_LONGER_THAN_INDEX = "shard_longer_than_index"  # samples beyond the index count (read, unused)
    SHARD_CHANGED = "shard_changed"  # a shard whose size or ETag is not what its index recorded
    # -- passed over on purpose (kosmos.data.holdout) --
    HELD_OUT = "held_out"  # held out for the validation loss: a training stream passes over it
    NOT_HELD_OUT = "not_held_out"  # a training sample: the validation stream passes over it
    ROLLED_BACK = "rolled_back"  # begun in the data steps a loss-spike rollback passed over (kosmos.train.spike)


# Reasons that condemn a whole shard (or the rest of it), not one sample.
SHARD_REASONS = (Reason.UNREADABLE_SHARD, Reason.PATH_OUTSIDE, Reason.TRUNCATED_SHARD, Reason.SHARD_CHANGED)

# Reasons of samples passed over on purpose: they do not count towards `data.max_skip_fraction`.
DELIBERATE_REASONS = (Reason.HELD_OUT, Reason.NOT_HELD_OUT)

# Samples skipped (or images dropped), by reason.
Counts = Counter[str]


def saved(counts: Mapping[str, int]) -> dict[str, int]:
    """Counts as they are saved and reported: by reason, sorted, zero counts left out."""
    return {reason: n for reason, n in sorted(counts.items()) if n}


class SkipSample(Exception):
    """A sample that cannot be used; `reason` (a `Reason`) is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
