"""Streaming training data: WebDataset corpora of text, image-caption pairs and interleaved documents.

`build_loader(...)` gives one rank's `StepLoader` (packed micro-batches per optimizer step, exact
resume); `image_transform(size)` is the CLIP preprocessing that evaluation and generation share.
"""

from kosmos import lazy_exports

_MODULES = {
    "kosmos.data.config": ["CorpusConfig", "DataConfig"],
    "kosmos.data.decode": ["image_transform"],
    "kosmos.data.loader": ["StepLoader", "build_loader"],
    "kosmos.data.stream": ["DataError", "SampleRef"],
}
__getattr__ = lazy_exports(__name__, _MODULES)
