import pytest

from kosmos.tokenizer import BOS, EOS, IGNORE_INDEX, PAD, UNK, Tokenizer, TokenizerError


def test_round_trip(tokenizer):
    text = "Lists are mutable sequences, typically used to store collections of items."
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert all(4 <= i < tokenizer.num_pieces + 1 for i in ids[1:-1])
    assert tokenizer.decode(ids) == text


def test_fairseq_layout(tokenizer):
    n = tokenizer.num_pieces
    assert (BOS, PAD, EOS, UNK) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == n + 7
    assert [tokenizer.mask_id, tokenizer.eod_id, tokenizer.boi_id, tokenizer.eoi_id] == [n + 1, n + 2, n + 3, n + 4]
    # Piece p of the SentencePiece model is id p + 1 (its <unk>, <s>, </s> map to ours).
    piece = tokenizer.sp.encode("def")[0]
    assert tokenizer.encode("def") == [piece + 1]
    assert tokenizer.encode("\u4e00\u4e01") and UNK in tokenizer.encode("\u4e00\u4e01")


def test_pieces_of_ordinary_and_special_ids(tokenizer):
    ids = tokenizer.encode("Lists are mutable")
    assert "".join(tokenizer.piece(i) for i in ids).replace("\u2581", " ").strip() == "Lists are mutable"
    assert [tokenizer.piece(i) for i in (BOS, PAD, EOS, UNK)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.piece(tokenizer.boi_id) == "<image>"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.piece(tokenizer.vocab_size)


def test_literal_image_tag_stays_text(tokenizer):
    ids = tokenizer.encode("see <image> and </image> here")
    assert not set(ids) & set(tokenizer.special_ids.values())
    assert tokenizer.decode(ids) == "see <image> and </image> here"


def test_interleaved_layout_and_labels(tokenizer):
    image = object()
    enc = tokenizer.encode_interleaved(["A cat:", image, "sits."], num_image_tokens=3)
    boi = enc.ids.index(tokenizer.boi_id)
    assert enc.ids[0] == BOS and enc.ids[-1] == EOS
    assert enc.ids[boi + 1 : boi + 4] == [4, 5, 6] and enc.ids[boi + 4] == tokenizer.eoi_id
    assert enc.image_mask == [boi < t < boi + 4 for t in range(len(enc))]
    labels = enc.labels()
    # Nothing is learned at the <image> marker or the slots; everything else predicts its successor.
    for t, label in enumerate(labels):
        if boi <= t < boi + 4 or t == len(enc) - 1:
            assert label == IGNORE_INDEX
        else:
            assert label == enc.ids[t + 1]


def test_prompt_parts_are_not_learned(tokenizer):
    enc = tokenizer.encode_interleaved(["Instruction.", "Answer."], 3, learn=[False, True])
    labels = enc.labels()
    n_prompt = 1 + len(tokenizer.encode("Instruction."))
    assert all(label == IGNORE_INDEX for label in labels[: n_prompt - 1])
    assert labels[n_prompt - 1 : -1] == enc.ids[n_prompt:]


def test_bad_model_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model"):
        Tokenizer(bad)
