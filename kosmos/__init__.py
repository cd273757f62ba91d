"""KOSMOS-1-style multimodal language models: model, data, training, evaluation and export."""

__version__ = "0.1.0"
