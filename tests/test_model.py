import dataclasses

import pytest
import torch

from kosmos.model import KosmosModel, generate, pad_batch, sequence_log_likelihood
from kosmos.tokenizer import IGNORE_INDEX, PAD

IMAGE = object()  # stands for one image in encode_interleaved


def _model(cfg, **text):
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text))
    return KosmosModel(cfg).eval()


def _images(n, cfg):
    return torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size)


@pytest.mark.parametrize("positions", ["sinusoidal", "xpos"])
def test_packed_row_equals_documents_alone(tokenizer, tiny_config, positions):
    model = _model(tiny_config, positions=positions)
    q = tiny_config.connector.num_queries
    docs = [
        tokenizer.encode_interleaved(["The first document", IMAGE, "has an image."], q),
        tokenizer.encode_interleaved(["Another one, plain text only."], q),
        tokenizer.encode_interleaved([IMAGE, "A third after an image."], q),
    ]
    images = _images(2, tiny_config)
    image_of_doc = [images[:1], None, images[1:]]
    ids, mask, pos, seg = [], [], [], []
    for i, d in enumerate(docs):
        ids += d.ids
        mask += d.image_mask
        pos += list(range(len(d)))
        seg += [i + 1] * len(d)
    pad = 5
    packed = model(
        torch.tensor([ids + [PAD] * pad]),
        image_mask=torch.tensor([mask + [False] * pad]),
        images=images,
        position_ids=torch.tensor([pos + [0] * pad]),
        segment_ids=torch.tensor([seg + [0] * pad]),
    ).logits[0]
    start = 0
    for d, imgs in zip(docs, image_of_doc):
        alone = model(torch.tensor([d.ids]), image_mask=torch.tensor([d.image_mask]), images=imgs).logits[0]
        torch.testing.assert_close(packed[start : start + len(d)], alone, atol=1e-5, rtol=1e-4)
        start += len(d)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_and_batched_generation_match(tokenizer, tiny_config, strategy):
    model = _model(tiny_config)
    q = tiny_config.connector.num_queries
    prompts = [
        tokenizer.encode_interleaved([IMAGE, "An image of"], q, eos=False),
        tokenizer.encode_interleaved(["Here are", IMAGE, "and", IMAGE, "; which is larger?"], q, eos=False),
        tokenizer.encode_interleaved(["A prompt with no picture at all, and longer than the others"], q, eos=False),
    ]
    images = _images(3, tiny_config)
    kwargs = {"max_new_tokens": 6, "strategy": strategy, "num_beams": 3}
    batched = generate(model, prompts, images, **kwargs)
    assert batched == generate(model, prompts, images, use_cache=False, **kwargs)
    one_by_one = [
        generate(model, [prompts[0]], images[:1], **kwargs)[0],
        generate(model, [prompts[1]], images[1:], **kwargs)[0],
        generate(model, [prompts[2]], None, **kwargs)[0],
    ]
    assert batched == one_by_one
    assert all(len(out) == 6 for out in batched)  # a random model does not emit </s> this early


def test_generation_stops_at_eos(tokenizer, tiny_config):
    model = _model(tiny_config)
    with torch.no_grad():
        # Every final state becomes all-ones, which scores </s> highest.
        model.layer_norm.weight.zero_()
        model.layer_norm.bias.fill_(1.0)
        model.lm_head.weight[2] += 100.0
    prompt = tokenizer.encode_interleaved(["Stop now"], 16, eos=False)
    assert generate(model, [prompt], max_new_tokens=5) == [[]]


def test_loss_ignores_slots_padding_and_masked_labels(tokenizer, tiny_config):
    model = _model(tiny_config)
    enc = tokenizer.encode_interleaved(["A digit:", IMAGE, "seven."], tiny_config.connector.num_queries)
    batch = pad_batch([enc, tokenizer.encode_interleaved(["short"], 16)], "right", images=_images(1, tiny_config))
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    labels[0, : len(enc)] = torch.tensor(enc.labels())
    out = model(**batch.inputs(), labels=labels)
    valid = labels != IGNORE_INDEX
    assert not valid[batch.image_mask].any()
    assert (out.token_loss[~valid] == 0).all()
    full = model(**batch.inputs()).logits  # without labels: every position's logits
    torch.testing.assert_close(out.logits, full[valid])
    manual = torch.nn.functional.cross_entropy(full[valid], labels[valid])
    torch.testing.assert_close(out.loss, manual)
    # Whatever sits in padding or behind -100 labels changes nothing.
    noisy = dataclasses.replace(batch, input_ids=batch.input_ids.masked_fill(batch.segment_ids == 0, 7))
    assert torch.equal(model(**noisy.inputs(), labels=labels).loss, out.loss)


def test_image_changes_only_what_follows_it(tokenizer, tiny_config):
    model = _model(tiny_config)
    enc = tokenizer.encode_interleaved(["Text before the picture", IMAGE, "and text after it."], 16)
    inputs = {"input_ids": torch.tensor([enc.ids]), "image_mask": torch.tensor([enc.image_mask])}
    first = model(**inputs, images=_images(1, tiny_config)).logits[0]
    second = model(**inputs, images=_images(1, tiny_config)).logits[0]
    boi = enc.ids.index(tokenizer.boi_id)
    assert torch.equal(first[: boi + 1], second[: boi + 1])
    after = torch.tensor(enc.image_mask).nonzero().max() + 1
    assert (first[after:] - second[after:]).abs().amax(-1).min() > 1e-4


def test_trainable_parameters_are_exactly_the_intended_set(tiny_config):
    vision = dataclasses.replace(tiny_config.vision, layers=3, trainable_blocks=1)
    cfg = dataclasses.replace(tiny_config, vision=vision)
    model = KosmosModel(cfg)
    trainable = set(model.trainable_parameter_names())
    names = {name for name, _ in model.named_parameters()}
    expected = {
        n
        for n in names
        if n.startswith(
            ("embed_tokens.", "layers.", "layer_norm.", "connector.", "vision.tower.transformer.resblocks.2.")
        )
    }
    assert trainable == expected
    assert any(n.startswith("vision.tower.transformer.resblocks.1.") for n in names - trainable)
    assert "vision.tower.ln_post.weight" in names - trainable


def test_likelihood_ranks_with_candidate_tokens_only(tokenizer, tiny_config):
    model = _model(tiny_config)
    images = _images(1, tiny_config)
    seqs = [
        tokenizer.encode_interleaved([IMAGE, "The photo of the", c], 16, eos=False, learn=[False, False, True])
        for c in ("cat", "number seven")
    ]
    scores = sequence_log_likelihood(model, seqs, torch.cat([images, images]))
    assert not scores.requires_grad  # scoring keeps no graph, also for a model in training mode
    for seq, score in zip(seqs, scores):
        alone = model(torch.tensor([seq.ids]), torch.tensor([seq.image_mask]), images,
                      labels=torch.tensor([seq.labels()]))
        torch.testing.assert_close(score, -alone.token_loss.sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_matches_sdpa(tokenizer, tiny_config):
    pytest.importorskip("flash_attn")
    flash = KosmosModel(dataclasses.replace(tiny_config, attention="flash")).cuda().bfloat16().eval()
    sdpa = KosmosModel(dataclasses.replace(tiny_config, attention="sdpa")).cuda().bfloat16().eval()
    sdpa.load_state_dict(flash.state_dict())
    ids = torch.randint(4, 900, (2, 40), device="cuda")
    segments = torch.tensor([[1] * 15 + [2] * 20 + [0] * 5, [1] * 40], device="cuda")
    positions = torch.cat([torch.arange(15), torch.arange(20), torch.zeros(5, dtype=torch.long)])
    positions = torch.stack([positions, torch.arange(40)]).cuda()
    a = flash(ids, position_ids=positions, segment_ids=segments).logits
    b = sdpa(ids, position_ids=positions, segment_ids=segments).logits
    real = segments > 0
    torch.testing.assert_close(a[real].float(), b[real].float(), atol=3e-2, rtol=3e-2)
