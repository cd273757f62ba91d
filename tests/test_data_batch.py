"""The typed batch: its tensors as model inputs, corpus names beside them, memory pinning."""

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from kosmos.bench.common import synthetic_batch, synthetic_packed_batch
from kosmos.data.batch import MODEL_INPUTS, Batch


def test_pinning_a_loader_item_pins_every_tensor_and_keeps_the_corpora(tiny_config, monkeypatch):
    pinned = []

    def pin(tensor: torch.Tensor) -> torch.Tensor:  # a stand-in: pinning itself needs CUDA
        pinned.append(tensor.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batch = Batch(**vars(synthetic_packed_batch(tiny_config, rows=2, seq_len=120)) | {"corpora": ("a", "b")})
    # What the loader yields: (step, worker, micro-batches, documents, skips, state).
    (_, _, (out,), _, _, _) = pin_memory((3, 0, [batch], [], [], {}))
    assert isinstance(out, Batch) and out.corpora == ("a", "b")
    assert len(pinned) == len(MODEL_INPUTS)
    for name, tensor in out.inputs().items():
        assert any(tensor is p for p in pinned), name
        assert torch.equal(tensor, getattr(batch, name))


def test_selected_rows_keep_the_images(tiny_config):
    batch = synthetic_batch(tiny_config, rows=3, seq_len=64, images_per_row=1)
    picked = batch.rows(torch.tensor([2, 2, 0]))
    assert torch.equal(picked.input_ids, batch.input_ids[[2, 2, 0]])
    assert torch.equal(picked.labels, batch.labels[[2, 2, 0]])
    assert picked.images is batch.images


def test_synthetic_images_sit_between_the_tokenizers_image_markers(tokenizer, tiny_config):
    batch = synthetic_batch(tiny_config, rows=2, seq_len=80, images_per_row=2)
    for ids, mask in zip(batch.input_ids, batch.image_mask):
        slots = mask.nonzero().flatten()
        starts = [s for s in slots.tolist() if not mask[s - 1]]
        ends = [s for s in slots.tolist() if not mask[s + 1]]
        assert [int(ids[s - 1]) for s in starts] == [tokenizer.boi_id] * 2
        assert [int(ids[e + 1]) for e in ends] == [tokenizer.eoi_id] * 2
