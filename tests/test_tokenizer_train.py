"""`kosmos tokenizer train | inspect`: SentencePiece from corpora, in the fairseq layout, in bounded memory."""

import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from kosmos.cli import main
from kosmos.data.sample import build_sample
from kosmos.data.shards import CorpusWriter
from kosmos.data.texts import corpus_texts
from kosmos.tokenizer import SPECIAL_SYMBOLS, UNK, Tokenizer
from kosmos.tokenizer.training import MAX_SENTENCE_BYTES, SentenceSample, placeholder_count, sentences


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    build_sample(out)
    return out


def _train(capsys, *args: str) -> tuple[int, dict | str]:
    """Exit code, and the JSON report (on success) or the error message."""
    code = main(["tokenizer", "train", *args, "--json", "--threads", "1"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else captured.err


def test_trained_on_the_sample_corpus_fairseq_layout_and_round_trip(sample, tmp_path, capsys):
    out = tmp_path / "sp.model"
    code, report = _train(
        capsys, "--corpus", str(sample), "--vocab-size", "600", "--character-coverage", "1", "--out", str(out)
    )
    assert code == 0
    # Text documents, captions and interleaved texts all fed the sample.
    kinds = {Path(folder).name for folder, count in report["documents"].items() if count}
    assert {"text", "caption", "interleaved"} <= kinds
    assert report["sentences_used"] == report["sentences_seen"] > 0

    tokenizer = Tokenizer(out)
    assert (tokenizer.num_pieces, tokenizer.vocab_size) == (600, 607)
    assert [tokenizer.sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert list(tokenizer.special_ids.values()) == list(range(601, 607))
    assert [tokenizer.special_ids[name] for name in SPECIAL_SYMBOLS] == list(range(601, 607))

    checked = 0
    for folder in ("text", "caption", "interleaved"):
        for texts in corpus_texts(sample / folder, Counter(), max_documents=20):
            for text in texts:
                for sentence in sentences(text):
                    # What SentencePiece's nmt_nfkc normalisation makes of it.
                    normal = " ".join(unicodedata.normalize("NFKC", sentence).split())
                    ids = tokenizer.encode(normal, bos=True, eos=True)
                    assert UNK not in ids
                    assert tokenizer.decode(ids) == normal
                    checked += 1
    assert checked > 60

    assert main(["tokenizer", "inspect", str(out), "--json", "--text", "An image of a cat"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["vocab_size"] == 607
    assert inspected["special_ids"]["<image>"] == tokenizer.boi_id
    assert inspected["settings"]["model_type"] == "unigram"
    assert inspected["settings"]["character_coverage"] == 1.0
    assert inspected["encodings"][0]["decoded"] == "An image of a cat"


def _text_corpus(folder: Path, documents: int, lines: int) -> Path:
    with CorpusWriter(folder, "text", samples_per_shard=100) as writer:
        for d in range(documents):
            text = "\n".join(f"document {d} says line {n} of {lines}" for n in range(lines))
            writer.write({"txt": text.encode()})
    return folder


def test_a_corpus_larger_than_the_sample_trains_on_the_sample(tmp_path, capsys):
    corpus = _text_corpus(tmp_path / "text", documents=300, lines=4)
    out = tmp_path / "sp.model"
    code, report = _train(
        capsys, "--corpus", str(corpus / "index.json"), "--vocab-size", "30", "--max-sentences", "250",
        "--out", str(out),
    )
    assert code == 0
    assert (report["sentences_seen"], report["sentences_used"]) == (1200, 250)
    assert Tokenizer(out).vocab_size == 37

    code, report = _train(
        capsys, "--corpus", str(corpus), "--vocab-size", "30", "--max-documents", "120",
        "--out", str(tmp_path / "fewer.model"),
    )
    assert code == 0
    assert report["documents"] == {str(corpus): 120} and report["sentences_seen"] == 480


def test_the_sample_corpus_gives_a_paper_sized_tokenizer_with_placeholders(sample, tmp_path, capsys):
    args = ["--corpus", str(sample), "--vocab-size", "64000"]
    code, error = _train(capsys, *args, "--out", str(tmp_path / "refused.model"))
    assert code == 2 and "too high" in error and "--placeholders" in error

    out = tmp_path / "sp.model"
    code, report = _train(capsys, *args, "--placeholders", "--out", str(out))
    assert code == 0
    tokenizer = Tokenizer(out)
    assert (tokenizer.num_pieces, tokenizer.vocab_size) == (64000, 64007)
    learned = 64000 - report["placeholders"]
    assert 1000 < learned < 64000 and placeholder_count(tokenizer) == report["placeholders"]
    assert list(tokenizer.special_ids.values()) == list(range(64001, 64007))
    # Encoding only ever gives learned pieces (ids up to `learned`), never a placeholder.
    highest = 0
    for folder in ("text", "caption", "interleaved"):
        for texts in corpus_texts(sample / folder, Counter(), max_documents=50):
            for text in texts:
                highest = max(highest, *tokenizer.encode(text))
    assert learned * 0.9 < highest <= learned


def test_sentence_sample_is_bounded_and_uniform():
    sample = SentenceSample(limit=100, seed=1)
    for i in range(10_000):
        sample.add(str(i))
        assert len(sample.sentences) <= 100
    kept = [int(s) for s in sample.sentences]
    assert sample.seen == 10_000 and len(set(kept)) == 100
    # Drawn from the whole stream, not its start or its end.
    assert 3500 < sum(kept) / len(kept) < 6500
    assert min(kept) < 2000 and max(kept) > 8000


def test_long_lines_are_cut_at_spaces():
    line = " ".join(f"word{i}" for i in range(2000))
    pieces = list(sentences(f"first line\n\n  {line}  \n"))
    assert pieces[0] == "first line"
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces)
    assert " ".join(pieces[1:]) == line


def test_bad_requests_exit_2_and_name_the_problem(tmp_path, capsys):
    corpus = _text_corpus(tmp_path / "text", documents=5, lines=1)
    code, error = _train(capsys, "--corpus", str(tmp_path / "gone"), "--vocab-size", "60", "--out", str(tmp_path / "a"))
    assert code == 2 and "gone: no corpus index" in error
    code, error = _train(capsys, "--corpus", str(corpus), "--vocab-size", "5000", "--out", str(tmp_path / "b.model"))
    assert code == 2 and "--vocab-size" in error and "too high" in error
    assert not (tmp_path / "b.model").exists() and not list(tmp_path.glob(".b.model*"))
    (tmp_path / "c.model").write_text("mine")
    code, error = _train(capsys, "--corpus", str(corpus), "--vocab-size", "60", "--out", str(tmp_path / "c.model"))
    assert code == 2 and "already exists" in error


def test_a_corpus_over_http_gives_the_sentences_of_the_same_corpus_on_disk(sample):
    from kosmos.data.serve import serve_http

    local: Counter[str] = Counter()
    remote: Counter[str] = Counter()
    with serve_http(sample) as (url, _):
        over_http = list(corpus_texts(f"{url}/caption", remote, max_documents=50))
    assert over_http == list(corpus_texts(sample / "caption", local, max_documents=50))
    assert len(over_http) == 50 and remote == local


def test_a_plain_prefix_of_shards_without_an_index_is_read_too(sample, tmp_path):
    import shutil

    from kosmos.data.serve import serve_http

    plain = tmp_path / "bucket" / "caption"  # img2dataset's output: shards, no index.json
    plain.mkdir(parents=True)
    for shard in sample.glob("caption/*.tar"):
        shutil.copy(shard, plain)
    local: Counter[str] = Counter()
    remote: Counter[str] = Counter()
    with serve_http(tmp_path / "bucket") as (url, _):
        over_http = list(corpus_texts(f"{url}/caption", remote, max_documents=50))
    assert over_http == list(corpus_texts(sample / "caption", local, max_documents=50))
    assert len(over_http) == 50 and remote == local
