"""Streaming training data: WebDataset corpora of text, image-caption pairs and interleaved documents.

`build_loader(...)` gives one rank's `StepLoader` (packed micro-batches per optimizer step, exact
resume); `image_transform(size)` is the CLIP preprocessing that evaluation and generation share.
"""

from kosmos.data.config import CorpusConfig, DataConfig
from kosmos.data.decode import image_transform
from kosmos.data.loader import StepLoader, build_loader
from kosmos.data.stream import DataError, SampleRef

__all__ = [
    "CorpusConfig",
    "DataConfig",
    "DataError",
    "SampleRef",
    "StepLoader",
    "build_loader",
    "image_transform",
]
