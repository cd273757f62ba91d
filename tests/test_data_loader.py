"""The streaming loader: exactly-once epochs across ranks and workers, exact resume, counted skips,
the per-step mixture and the batch contract, on small hand-made shards."""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset
from PIL import Image

from kosmos.config import ConfigError, from_dict
from kosmos.data import DataConfig, build_loader
from kosmos.data.batch import Batch
from kosmos.data.decode import DECODERS, Document
from kosmos.data.inspection import inspect
from kosmos.data.shards import CorpusIndex, ShardInfo, read_samples, write_index
from kosmos.data.state import LoaderState
from kosmos.tokenizer import IGNORE_INDEX, PAD

IMAGE_SIZE = 16
SLOTS = 4  # image slots per image


def png(size: int | tuple[int, int] = 64, value: int = 128, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size if isinstance(size, tuple) else (size, size), value).save(out, "PNG")
    return out.getvalue()


def noisy_png(size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.frombytes("L", (size, size), random.Random(size).randbytes(size * size)).save(out, "PNG")
    return out.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> list[str]:
    keys = []
    with webdataset.TarWriter(str(path), encoder=False, mtime=0) as tar:
        for sample in samples:
            keys.append(f"{path.stem}-{len(keys):04d}")
            tar.write({"__key__": keys[-1], **sample})
    return keys


def write_corpus(folder: Path, kind: str, shards: list[list[dict[str, bytes]]]) -> list[tuple[str, int]]:
    """Shards as given (uneven sizes welcome); returns (shard name, index) of every sample."""
    folder.mkdir(parents=True)
    infos, refs = [], []
    for i, samples in enumerate(shards):
        name = f"part-{i}.tar"
        write_shard(folder / name, samples)
        refs += [(name, j) for j in range(len(samples))]
        infos.append(ShardInfo(name, len(samples)))
    write_index(folder, CorpusIndex(kind, infos))
    return refs


def text_doc(i: int) -> dict[str, bytes]:
    words = random.Random(i).randint(3, 120)
    return {"txt": (f"Document {i} says " + " ".join(["def class import"] * words)).encode()}


def caption_pair(i: int) -> dict[str, bytes]:
    return {"png": png(64, value=i % 13 * 20), "txt": f"shade {i % 13}".encode()}


def interleaved_doc(i: int, images: int = 2) -> dict[str, bytes]:
    texts, names, members = [f"Story {i}."], [None], {}
    for j in range(images):
        shade = (i + j) % 13
        texts += [None, f"shade {shade}"]
        names += [f"{2 * j + 1}.png", None]
        members[f"{2 * j + 1}.png"] = png(64, value=shade * 20)
    return {"json": json.dumps({"texts": texts, "images": names}).encode(), **members}


def data_config(corpora: list[dict], **options) -> DataConfig:
    raw = {"seq_len": 64, "micro_batch_size": 2, "num_workers": 0, **options, "corpora": corpora}
    return from_dict(DataConfig, raw, "data")


def loader_for(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1):
    return build_loader(cfg, tokenizer, IMAGE_SIZE, SLOTS, rank=rank, world_size=world_size)


def run_steps_until_epoch(loader, epochs: int = 1, max_steps: int = 400):
    """Yields step after step until every stream of every corpus has finished `epochs` epochs."""
    for step, batches in enumerate(loader, start=1):
        yield batches
        if min(loader.epochs.values()) >= epochs:
            return
        assert step < max_steps


def run_epoch(loader, epochs: int = 1) -> list:
    """The sample refs of the documents begun until every stream finished `epochs` epochs."""
    return [ref for _ in run_steps_until_epoch(loader, epochs) for ref in loader.last_step_samples]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, dict[str, list]]:
    root = tmp_path_factory.mktemp("corpora")
    sizes = [7, 11, 5, 9, 8]
    text = [[text_doc(sum(sizes[:s]) + i) for i in range(n)] for s, n in enumerate(sizes)]
    captions = [[caption_pair(20 * s + i) for i in range(n)] for s, n in enumerate([20, 14, 18])]
    documents = [
        [interleaved_doc(10 * s + i, images=1 + i % 3) for i in range(n)] for s, n in enumerate([6, 5])
    ]
    refs = {
        "text": write_corpus(root / "text", "text", text),
        "caption": write_corpus(root / "caption", "caption", captions),
        "interleaved": write_corpus(root / "interleaved", "interleaved", documents),
    }
    return root, refs


def corpus(root: Path, kind: str, tokens_per_step: int, **options) -> dict:
    return {"kind": kind, "path": str(root / kind), "tokens_per_step": tokens_per_step, **options}


@pytest.mark.slow  # loader worker processes
@pytest.mark.parametrize("stop_at", [None, 2], ids=["straight", "stopped-and-resumed"])
def test_each_sample_once_per_epoch_over_two_ranks_of_two_workers(corpora, tokenizer, stop_at):
    root, expected = corpora
    cfg = data_config([corpus(root, "text", 128), corpus(root, "caption", 128)], num_workers=2)
    seen, orders = Counter(), {}
    for rank in range(2):
        loader, refs = loader_for(cfg, tokenizer, rank, world_size=2), []
        if stop_at:
            for _ in itertools.islice(loader, stop_at):
                refs += loader.last_step_samples
            assert loader.epochs == {"text": 0, "caption": 0}  # stopped inside the first epoch
            state = json.loads(json.dumps(loader.state_dict()))
            loader = loader_for(cfg, tokenizer, rank, world_size=2)
            loader.load_state_dict(state)
        refs += run_epoch(loader, epochs=2)
        seen.update((r.corpus, r.shard, r.index) for r in refs if r.epoch == 0)
        orders[rank] = [
            [(r.shard, r.index) for r in refs if r.epoch == e and r.corpus == "text"] for e in (0, 1)
        ]
    for name in ("text", "caption"):
        assert sorted((shard, i) for (c, shard, i) in seen if c == name) == sorted(expected[name])
    assert set(seen.values()) == {1}
    # The next epoch reshuffles: same samples, another order.
    assert orders[0][0] != orders[0][1][: len(orders[0][0])]


@pytest.mark.slow  # loader worker processes
def test_resume_mid_epoch_repeats_and_skips_nothing(corpora, tokenizer):
    root, _ = corpora
    cfg = data_config(
        [corpus(root, "text", 128), corpus(root, "caption", 128), corpus(root, "interleaved", 128)],
        num_workers=2,
        micro_batch_size=3,
    )
    straight = loader_for(cfg, tokenizer, rank=1, world_size=2)
    expected = [(batches, straight.last_step_samples) for batches in itertools.islice(straight, 20)]

    first = loader_for(cfg, tokenizer, rank=1, world_size=2)
    for _ in itertools.islice(first, 7):  # odd, so the other worker's turn is next
        pass
    state = json.loads(json.dumps(first.state_dict()))
    assert any(
        stream["offset"] > 0
        for worker in state["workers"]
        for corpus in worker.values()
        for stream in corpus["streams"].values()
    )
    resumed = loader_for(cfg, tokenizer, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (want, want_refs), got in zip(expected[7:], resumed):
        assert resumed.last_step_samples == want_refs
        for a, b in zip(want, got, strict=True):
            assert a.corpora == b.corpora
            for key, tensor in a.inputs().items():
                assert torch.equal(tensor, getattr(b, key)), key
    assert resumed.step == 20
    assert resumed.skipped == straight.skipped == {}


def test_a_saved_state_keeps_its_layout_through_the_typed_state(corpora, tokenizer):
    root, _ = corpora
    cfg = data_config(
        [corpus(root, "text", 128), corpus(root, "interleaved", 128)],
        virtual_streams=3,
        validation={"holdout": 0.2},
    )
    loader = loader_for(cfg, tokenizer)
    for _ in itertools.islice(loader, 3):
        pass
    state = json.loads(json.dumps(loader.state_dict()))
    assert json.dumps(LoaderState.from_saved(state).saved()) == json.dumps(state)  # key order too
    assert list(state) == [
        "shuffle_spans", "shuffle_window", "version", "rank", "world_size", "num_workers",
        "virtual_streams", "seed", "corpora", "holdout", "step", "workers",
    ]  # fmt: skip
    (worker,) = state["workers"]
    assert list(worker) == ["text", "interleaved"]
    assert list(worker["text"]) == ["turn", "streams"] and list(worker["text"]["streams"]) == ["0", "1", "2"]
    streams = [s for c in worker.values() for s in c["streams"].values()]
    assert all(
        list(s) == ["epoch", "position", "offset", "tried", "skipped", "dropped_images"] for s in streams
    )
    assert sum(s["skipped"].get("held_out", 0) for s in streams) == loader.skipped["held_out"] > 0


def test_a_state_saved_before_the_epoch_order_settings_were_recorded_resumes(corpora, tokenizer):
    root, _ = corpora
    old = {
        "version": 2,
        "rank": 0,
        "world_size": 1,
        "num_workers": 1,
        "virtual_streams": 1,
        "seed": 0,
        "corpora": {"text": {"shards": 5, "samples": 40}},
        "step": 3,
        "workers": [
            {
                "text": {
                    "turn": 0,
                    "streams": {
                        "0": {
                            "epoch": 0,
                            "position": 5,
                            "offset": 4,
                            "tried": 5,
                            "skipped": {"empty_text": 1},
                            "dropped_images": {},
                        }
                    },
                }
            }
        ],
    }
    assert LoaderState.from_saved(old).saved() == old
    cfg = data_config([corpus(root, "text", 128)])
    loader = loader_for(cfg, tokenizer)
    loader.load_state_dict(old)
    assert loader.state_dict() == {"shuffle_spans": cfg.shuffle_spans, "shuffle_window": cfg.shuffle_window, **old}
    assert loader.skipped == {"empty_text": 1}
    next(iter(loader))
    assert loader.step == 4
    assert loader.state_dict()["workers"][0]["text"]["streams"]["0"]["position"] > 5


@pytest.fixture(scope="module")
def elastic_corpora(tmp_path_factory) -> tuple[Path, dict[str, list]]:
    """Corpora of every kind with enough samples for 12 virtual streams."""
    root = tmp_path_factory.mktemp("elastic")
    refs = {
        "text": write_corpus(
            root / "text",
            "text",
            [[text_doc(10 * s + i) for i in range(n)] for s, n in enumerate([9, 14, 6, 11])],
        ),
        "caption": write_corpus(
            root / "caption",
            "caption",
            [[caption_pair(30 * s + i) for i in range(n)] for s, n in enumerate([16, 9, 21])],
        ),
        "interleaved": write_corpus(
            root / "interleaved",
            "interleaved",
            [
                [interleaved_doc(10 * s + i, images=1 + i % 2) for i in range(n)]
                for s, n in enumerate([8, 7, 9])
            ],
        ),
    }
    return root, refs


def elastic_config(root: Path, num_workers: int) -> DataConfig:
    # 768 = 64 x 12 tokens: whole rows on 1, 2, 3 and 4 ranks.
    return data_config(
        [corpus(root, kind, 768) for kind in ("text", "caption", "interleaved")],
        num_workers=num_workers,
        micro_batch_size=3,
        virtual_streams=12,
        shuffle_spans=2,
        shuffle_window=4,
    )


def check_budgets(batches: list[dict], rows_per_step: dict[str, int]) -> None:
    rows, tokens = Counter(), Counter()
    for batch in batches:
        for b, source in enumerate(batch.corpora):
            rows[source] += 1
            tokens[source] += int((batch.segment_ids[b] > 0).sum())
    assert rows == rows_per_step
    assert all(0 < tokens[name] <= n * 64 for name, n in rows.items())


@pytest.mark.slow  # loader worker processes
def test_resume_on_other_ranks_and_workers_reads_each_sample_once(elastic_corpora, tokenizer):
    root, expected = elastic_corpora
    seen_before, states = Counter(), []
    for rank in range(2):
        loader = loader_for(elastic_config(root, num_workers=2), tokenizer, rank, world_size=2)
        for _ in itertools.islice(loader, 3):
            seen_before.update((r.corpus, r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
        assert loader.epochs["text"] == 0  # stopped inside the first epoch
        states.append(json.loads(json.dumps(loader.state_dict())))
    for world_size, workers in ((1, 0), (3, 2), (4, 1)):
        seen = Counter(seen_before)
        for rank in range(world_size):
            loader = loader_for(elastic_config(root, workers), tokenizer, rank, world_size=world_size)
            loader.load_state_dict(states)
            for batches in run_steps_until_epoch(loader):
                check_budgets(batches, loader.rows_per_step)
                seen.update((r.corpus, r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
        for kind, refs in expected.items():
            assert sorted((shard, i) for (c, shard, i) in seen if c == kind) == sorted(refs), (
                world_size,
                kind,
            )
        assert set(seen.values()) == {1}, (world_size, workers)


def test_regrouped_resume_in_process_and_its_limit(elastic_corpora, tokenizer):
    root, expected = elastic_corpora
    cfg = elastic_config(root, num_workers=0)
    seen, states = Counter(), []
    for rank in range(4):
        loader = loader_for(cfg, tokenizer, rank, world_size=4)
        for _ in itertools.islice(loader, 2):
            seen.update((r.corpus, r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
        states.append(loader.state_dict())
    resumed = loader_for(cfg, tokenizer)
    resumed.load_state_dict(states)
    assert resumed.step == 2
    for _ in run_steps_until_epoch(resumed):
        seen.update((r.corpus, r.shard, r.index) for r in resumed.last_step_samples if r.epoch == 0)
    assert sorted((c, shard, i) for (c, shard, i) in seen) == sorted(
        (kind, *ref) for kind, refs in expected.items() for ref in refs
    )
    assert set(seen.values()) == {1}

    too_many = data_config([corpus(root, "text", 64 * 16)], micro_batch_size=1)
    saved = loader_for(
        data_config([corpus(root, "text", 64)], micro_batch_size=1, virtual_streams=12), tokenizer
    )
    with pytest.raises(ConfigError, match="data.virtual_streams: 12 virtual streams can feed at most 12"):
        loader_for(too_many, tokenizer, world_size=16).load_state_dict([saved.state_dict()])


def test_mixture_fills_each_step_with_its_token_budgets(corpora, tokenizer):
    root, _ = corpora
    budgets = {"text": 192, "caption": 128, "interleaved": 64}
    cfg = data_config([corpus(root, kind, n) for kind, n in budgets.items()], micro_batch_size=3)
    loader = loader_for(cfg, tokenizer)
    assert loader.micro_batches_per_step == 2
    longest: Counter[str] = Counter()
    for batches in itertools.islice(loader, 12):
        rows, tokens = Counter(), Counter()
        for batch in batches:
            for b, source in enumerate(batch.corpora):
                rows[source] += 1
                tokens[source] += int((batch.segment_ids[b] > 0).sum())
                lengths = torch.bincount(batch.segment_ids[b])[1:]
                longest[source] = max(longest[source], int(lengths.max()))
        assert rows == {name: n // cfg.seq_len for name, n in budgets.items()}
        assert tokens["text"] == budgets["text"]  # text continues across rows: rows are full
        for name, budget in budgets.items():
            # Each row ends less than one document short of full.
            assert budget - rows[name] * longest[name] < tokens[name] <= budget


def test_batches_keep_the_contract(corpora, tokenizer):
    root, _ = corpora
    cfg = data_config(
        [corpus(root, "caption", 128), corpus(root, "interleaved", 128), corpus(root, "text", 128)]
    )
    loader = loader_for(cfg, tokenizer)
    checked_images = 0
    for batches in itertools.islice(loader, 6):
        assert len(batches) == loader.micro_batches_per_step
        for batch in batches:
            checked_images += check_contract(batch, tokenizer)
    assert checked_images > 10


def check_contract(batch: Batch, tokenizer) -> int:
    """Every rule of the batch contract on one batch; returns how many image contents it matched."""
    rows, length = batch.input_ids.shape
    for key in ("image_mask", "labels", "position_ids", "segment_ids"):
        assert getattr(batch, key).shape == (rows, length)
    assert len(batch.corpora) == rows
    mask = batch.image_mask
    assert batch.images.shape == (int(mask.sum()) // SLOTS, 3, IMAGE_SIZE, IMAGE_SIZE)
    image, matched = 0, 0
    for b in range(rows):
        ids, labels = batch.input_ids[b].tolist(), batch.labels[b].tolist()
        segments, positions = batch.segment_ids[b].tolist(), batch.position_ids[b].tolist()
        for t in range(length):
            if segments[t] == 0:
                assert ids[t] == PAD and labels[t] == IGNORE_INDEX and not mask[b, t]
                continue
            first = t == 0 or segments[t - 1] != segments[t]
            last = t == length - 1 or segments[t + 1] != segments[t]
            assert positions[t] == (0 if first else positions[t - 1] + 1)
            if ids[t] == tokenizer.boi_id:
                assert mask[b, t + 1 : t + 1 + SLOTS].all() and ids[t + 1 + SLOTS] == tokenizer.eoi_id
                # The image in this block is the one the text after it names.
                end = t + 2 + SLOTS
                while end < length and segments[end] == segments[t] and ids[end] not in (2, tokenizer.boi_id):
                    end += 1
                after = tokenizer.decode(ids[t + 2 + SLOTS : end]).split()
                complete = end < length and segments[end] == segments[t]  # not cut by the row's end
                if complete and len(after) == 2 and after[0] == "shade":
                    level = int(after[1].rstrip(".")) * 20 / 255
                    want = (level - 0.48145466) / 0.26862954
                    assert batch.images[image, 0].mean().item() == pytest.approx(want, abs=1e-3)
                    matched += 1
                image += 1
            if mask[b, t] or ids[t] == tokenizer.boi_id or last:
                assert labels[t] == IGNORE_INDEX
            else:
                assert labels[t] == ids[t + 1]
    return matched


def test_per_part_learn_flags_mask_the_prompt(corpora, tokenizer, monkeypatch):
    root, _ = corpora
    prompt, answer = "Question: what is two and three?", " Answer: five"
    monkeypatch.setitem(
        DECODERS, "text", lambda sample, corpus: Document([prompt, answer], learn=[False, True])
    )
    loader = loader_for(data_config([corpus(root, "text", 128)]), tokenizer)
    whole = len(tokenizer.encode(prompt)) + len(tokenizer.encode(answer)) + 2
    batch = next(iter(loader))[0]
    learned_per_document = []
    for b in range(2):
        segments = batch.segment_ids[b]
        for s in segments.unique()[1:]:
            in_segment = segments == s
            if int(in_segment.sum()) == whole:
                learned_per_document.append(int((batch.labels[b][in_segment] != IGNORE_INDEX).sum()))
    assert learned_per_document and set(learned_per_document) == {len(tokenizer.encode(answer)) + 1}


# -- bad input ------------------------------------------------------------------------------------


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("L", (64, 64)).save(out, "GIF")
    return out.getvalue()


def truncated_shard(path: Path, samples: list[dict[str, bytes]], cut_in: int) -> None:
    """Writes the shard, then cuts it in the middle of sample `cut_in`'s data."""
    keys = write_shard(path, samples)
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(keys[cut_in]))
        cut = member.offset_data + member.size // 2
    path.write_bytes(path.read_bytes()[:cut])


def layout(texts: list, images: list, members: dict[str, bytes] | None = None) -> dict[str, bytes]:
    return {"json": json.dumps({"texts": texts, "images": images}).encode(), **(members or {})}


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory):
    """Every kind of bad input planted among good samples. Returns the root, and per corpus the
    good samples and the skip reason of each bad one, by (shard, index)."""
    root = tmp_path_factory.mktemp("bad")
    bomb = io.BytesIO()
    Image.new("1", (8200, 8200)).save(bomb, "PNG")
    text = [
        (text_doc(0), None),
        ({"txt": b""}, "empty_text"),
        ({"txt": b"  \n\t"}, "empty_text"),
        ({"txt": b"\xff\xfe not utf-8"}, "invalid_utf8"),
        ({"json": b"{}"}, "missing_text"),
        ({"txt": b"\x01\x02"}, "no_tokens"),
        ({"txt": b"Read; the pickle beside it is not.", "pyd": b"\x80\x04K\x01."}, None),
        (text_doc(1), None),
    ]
    captions = [
        (caption_pair(0), None),
        ({"png": noisy_png()[:2000], "txt": b"cut short"}, "corrupt_image"),
        ({"jpg": b"these bytes are not an image", "txt": b"an image?"}, "not_an_image"),
        ({"png": gif(), "txt": b"a gif under a png name"}, "not_an_image"),
        ({"png": png(64)}, "missing_text"),
        ({"png": png(64), "txt": b"   "}, "empty_text"),
        ({"txt": b"a caption without its image"}, "missing_image"),
        ({"png": bomb.getvalue(), "txt": b"a decompression bomb"}, "image_too_large"),
        ({"png": png(32), "txt": b"too small"}, "small_image"),
        ({"png": png(64), "txt": ("many words " * 40).encode()}, "too_long"),
        (caption_pair(1), None),
        ({**caption_pair(2), "json": b'{"url": "https://example.com/x.jpg"}'}, None),
    ]
    seven = layout(
        ["Seven images."] + [None] * 7,
        [None] + [f"{i}.png" for i in range(1, 8)],
        {f"{i}.png": png(64) for i in range(1, 8)},
    )
    tiny_and_big = layout(
        ["tiny:", None, "big:", None], [None, "1.png", None, "3.png"], {"1.png": png(8), "3.png": png(64)}
    )
    documents = [
        (interleaved_doc(0), None),
        ({"json": b"{not json"}, "invalid_json"),
        ({"json": b"[1, 2]"}, "invalid_json"),
        ({"png": png(64)}, "invalid_json"),
        (layout(["a", None], [None]), "mismatched_lists"),
        (layout(["a", "b"], [None, "1.png"], {"1.png": png(64)}), "mismatched_lists"),
        (layout(["a", None], [None, "1.png"]), "missing_image"),
        (layout([None], ["0.png"], {"0.png": png(64)}), "empty_text"),
        (layout(["a", None], [None, "1.png"], {"1.png": noisy_png()[:2000]}), "corrupt_image"),
        (seven, None),  # keeps 5 images, drops 2
        (tiny_and_big, None),  # drops the 8x8 image
    ]
    expected = {}
    for kind, planted in (("text", text), ("caption", captions), ("interleaved", documents)):
        write_corpus(root / kind, kind, [[sample for sample, _ in planted]])
        expected[kind] = {("part-0.tar", i): reason for i, (_, reason) in enumerate(planted)}

    # Two more text shards: one cut short in its fourth sample, one that is not a tar file at all.
    truncated_shard(root / "text" / "part-1.tar", [text_doc(i) for i in range(10, 16)], cut_in=3)
    (root / "text" / "part-2.tar").write_bytes(b"this is not a tar file\n" * 50)
    shards = [ShardInfo("part-0.tar", len(text)), ShardInfo("part-1.tar", 6), ShardInfo("part-2.tar", 4)]
    write_index(root / "text", CorpusIndex("text", shards))
    expected["text"].update({("part-1.tar", i): None if i < 3 else "truncated_shard" for i in range(6)})
    expected["text"].update({("part-2.tar", i): "unreadable_shard" for i in range(4)})
    return root, expected


def test_bad_input_is_skipped_and_counted_by_reason(bad_corpora, tokenizer):
    root, expected = bad_corpora
    cfg = data_config([corpus(root, kind, 64) for kind in expected], micro_batch_size=3)
    loader = loader_for(cfg, tokenizer)
    arrived, skipped, reasons = Counter(), {}, Counter()
    for _ in run_steps_until_epoch(loader):
        arrived.update((r.corpus, r.shard, r.index) for r in loader.last_step_samples if r.epoch == 0)
        skipped.update(
            {(r.corpus, r.shard, r.index): why for r, why in loader.last_step_skipped if r.epoch == 0}
        )
        reasons.update(why for _, why in loader.last_step_skipped)
    for kind, planted in expected.items():
        good = {(kind, *where) for where, why in planted.items() if why is None}
        assert {where for where in arrived if where[0] == kind} == good
        assert {where[1:]: why for where, why in skipped.items() if where[0] == kind} == {
            where: why for where, why in planted.items() if why is not None
        }
    assert set(arrived.values()) == {1}
    assert loader.skipped == dict(reasons)  # the counters the trainer logs agree with the samples
    assert loader.dropped_images["over_max_images"] % 2 == 0 and loader.dropped_images["small_image"] >= 1

    # `kosmos data inspect` counts the same (all but too_long, which depends on seq_len).
    report = inspect(root, tokenizer)
    want = Counter(
        why for planted in expected.values() for why in planted.values() if why not in (None, "too_long")
    )
    assert report["skipped"] == dict(want)
    assert report["samples"] == sum(
        why in (None, "too_long") for planted in expected.values() for why in planted.values()
    )
    assert report["corpora"]["interleaved"]["dropped_images"] == {"over_max_images": 2, "small_image": 1}


def test_shard_reads_keep_only_text_json_and_image_members(tmp_path):
    write_shard(
        tmp_path / "a.tar", [{"txt": b"hello", "json": b"{}", "png": png(), "pyd": b"\x80\x04.", "npy": b"x"}]
    )
    with open(tmp_path / "a.tar", "rb") as file:
        (sample,) = read_samples(file, "a.tar")
    assert sorted(sample.members) == ["json", "png", "txt"]


# -- configuration --------------------------------------------------------------------------------


def test_config_errors_name_the_key(corpora, tokenizer, tmp_path):
    root, _ = corpora
    missing = data_config(
        [corpus(root, "text", 64), {"kind": "caption", "path": str(tmp_path / "no"), "tokens_per_step": 64}]
    )
    with pytest.raises(ConfigError, match=r"data.corpora\[1\].path: .* does not exist or has no index"):
        loader_for(missing, tokenizer)
    with pytest.raises(ConfigError, match=r"data.corpora\[0\].kind: caption, but .* holds a text corpus"):
        loader_for(data_config([{**corpus(root, "text", 64), "kind": "caption"}]), tokenizer)
    with pytest.raises(ConfigError, match=r"data.corpora\[0\].tokens_per_step: 100 is not a multiple"):
        loader_for(data_config([corpus(root, "text", 100)]), tokenizer)
    with pytest.raises(ConfigError, match="data.micro_batch_size: a step holds 3 rows"):
        loader_for(data_config([corpus(root, "text", 192)], micro_batch_size=2), tokenizer)
    with pytest.raises(
        ConfigError, match=r"data.corpora\[0\].path: .* has 11 samples, fewer than the 16 streams"
    ):
        loader_for(data_config([corpus(root, "interleaved", 64 * 8)], num_workers=2), tokenizer, world_size=8)
    with pytest.raises(ConfigError, match=r"data.corpora\[1\].name: 'text' is used twice"):
        data_config([corpus(root, "text", 64), corpus(root, "text", 64)])
    with pytest.raises(ConfigError, match=r"data.corpora\[0\].kind: 'pictures' is not one of"):
        data_config([corpus(root, "pictures", 64)])
