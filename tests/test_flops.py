"""The FLOPs behind MFU are the FLOPs the model performs: counted by torch's FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kosmos.model import KosmosModel, attention_pairs, training_flops
from kosmos.tokenizer import IGNORE_INDEX


@pytest.mark.parametrize("learned", [64, 10])
def test_training_flops_equal_the_counted_forward_and_backward(tiny_config, learned):
    model = KosmosModel(tiny_config)
    rows, length = 2, 64
    ids = torch.randint(10, 900, (rows, length))
    labels = ids.clone()
    labels[:, : length - learned] = IGNORE_INDEX  # logits (the LM head) only where a label is learned
    # The math kernel runs attention as matmuls, which the counter sees on every device.
    segment_ids = torch.ones_like(ids)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels=labels, segment_ids=segment_ids).loss.backward()
    flops = training_flops(
        tiny_config,
        positions=rows * length,
        labelled=int((labels != IGNORE_INDEX).sum()),
        images=0,
        attention_pairs=float(attention_pairs(segment_ids).sum()),
    )
    assert flops == {"language": counter.get_total_flops(), "vision": 0.0}


def test_attention_pairs_of_whole_rows_and_of_documents():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert attention_pairs(segment_ids).tolist() == [36.0, 36.0, 36.0]
    # Per document: each packed document attends within itself; padding is skipped.
    assert attention_pairs(segment_ids, per_document=True).tolist() == [3 * 3 + 2 * 2, 36.0, 0.0]
