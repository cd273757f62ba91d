"""The batch of the data-to-model contract (docs/design.md, "The batch contract"): what the loader,
padding and the benchmarks hand the model. `corpora` names the corpus of each row (training batches
only): names beside the tensors, never among them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# The tensors the model takes, by the names of its keyword arguments.
MODEL_INPUTS = ("input_ids", "image_mask", "images", "position_ids", "segment_ids", "labels")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    image_mask: torch.Tensor  # [B, T] bool: image slots
    position_ids: torch.Tensor  # [B, T] long
    segment_ids: torch.Tensor  # [B, T] long, 0 = padding
    images: torch.Tensor | None = None  # [n, 3, H, W]
    labels: torch.Tensor | None = None  # [B, T] long, shifted targets, -100 where nothing is learned
    corpora: tuple[str, ...] = ()  # the corpus of each row

    def inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments (those that are set)."""
        return {name: value for name in MODEL_INPUTS if (value := getattr(self, name)) is not None}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return dataclasses.replace(
            self,
            **{name: value.to(device, non_blocking=non_blocking) for name, value in self.inputs().items()},
        )

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory: the torch DataLoader calls this when it pins memory."""
        return dataclasses.replace(
            self, **{name: value.pin_memory() for name, value in self.inputs().items()}
        )

    def rows(self, index: torch.Tensor) -> Batch:
        """The rows `index` selects (a long tensor), images left as they are: rows that share their
        images (a prompt's beams) keep them."""
        selected = {
            name: getattr(self, name).index_select(0, index)
            for name in MODEL_INPUTS
            if name != "images" and getattr(self, name) is not None
        }
        corpora = tuple(self.corpora[i] for i in index.tolist()) if self.corpora else ()
        return dataclasses.replace(self, **selected, corpora=corpora)
