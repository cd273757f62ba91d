"""The held-out set and the validation loss: which samples are held out, what the loss is, per rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kosmos.config import ConfigError
from kosmos.data.batch import Batch
from kosmos.data.config import CorpusConfig, DataConfig, ValidationConfig
from kosmos.data.holdout import is_held_out
from kosmos.data.loader import build_loader
from kosmos.data.sample import build_sample
from kosmos.data.shards import read_index, read_samples
from kosmos.data.skips import Reason
from kosmos.model import KosmosModel, load_model_config
from kosmos.tokenizer import IGNORE_INDEX, Tokenizer
from kosmos.train.validation import ValidationSet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "sample"
    build_sample(out)
    return out


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group (the validation sums are all-reduced)."""
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield


def data_config(sample: Path, share: float, kinds=("text", "interleaved"), rows: int = 6) -> DataConfig:
    corpora = [CorpusConfig(kind, str(sample / kind), 512) for kind in kinds]
    return DataConfig(
        corpora,
        seq_len=128,
        micro_batch_size=2,
        num_workers=0,
        validation=ValidationConfig(holdout=share, rows=rows),
    )


def sample_keys(corpus: str) -> dict[tuple[str, int], str]:
    """(shard, index in shard) -> sample key, for every sample of a local corpus."""
    index = read_index(corpus)
    keys = {}
    for shard in index.shards:
        with open(Path(corpus) / shard.name, "rb") as f:
            for i, raw in enumerate(read_samples(f, shard.name)):
                keys[shard.name, i] = raw.key
    return keys


def test_the_held_out_share_never_reaches_a_training_batch_on_any_world_size(sample):
    share = 0.2
    keys = sample_keys(str(sample / "text"))
    held_out = {where for where, key in keys.items() if is_held_out(where[0], key, share)}
    assert 0 < len(held_out) < len(keys)
    tokenizer = Tokenizer(sample / "tokenizer.model")
    for world in (1, 2):
        cfg = data_config(sample, share, kinds=("text",))
        trained: set[tuple[str, int]] = set()
        counted = 0
        for rank in range(world):
            loader = build_loader(cfg, tokenizer, 32, 16, rank=rank, world_size=world)
            for _ in iter(loader):
                trained |= {(ref.shard, ref.index) for ref in loader.last_step_samples if ref.epoch == 0}
                if loader.epochs["text"] >= 1:
                    break
            counted += loader.skipped.get(Reason.HELD_OUT, 0)
        assert trained == set(keys) - held_out
        # Counted on purpose, once per epoch read (the last step may have begun the next epoch).
        assert len(held_out) <= counted < 2 * len(held_out)


def tiny_model(sample: Path) -> KosmosModel:
    torch.manual_seed(0)
    cfg = load_model_config(REPO / "configs/model/tiny.yaml", ["text.layers=2"])
    return KosmosModel(cfg).eval()


def direct_loss(model: KosmosModel, rows: list[Batch]) -> tuple[float, int]:
    """Each one-row batch on its own: the loss summed over labelled tokens, and their count."""
    total, labelled = 0.0, 0
    with torch.no_grad():
        for row in rows:
            total += float(model(**row.inputs()).token_loss.double().sum())
            labelled += int((row.labels != IGNORE_INDEX).sum())
    return total, labelled


def one_row_batches(validation: ValidationSet) -> list[Batch]:
    rows = []
    for batch, counted in validation.passes:
        if not counted:
            continue
        images = iter(batch.images)
        for b in range(len(batch.corpora)):
            n = int(batch.image_mask[b].sum()) // 16
            one = slice(b, b + 1)
            rows.append(
                Batch(
                    batch.input_ids[one],
                    batch.image_mask[one],
                    batch.position_ids[one],
                    batch.segment_ids[one],
                    images=torch.stack([next(images) for _ in range(n)]) if n else batch.images[:0],
                    labels=batch.labels[one],
                    corpora=batch.corpora[one],
                )
            )
    return rows


def test_validation_loss_is_the_direct_loss_of_the_held_out_rows_at_one_and_two_ranks(sample, process_group):
    cfg = data_config(sample, 0.2)
    tokenizer = Tokenizer(sample / "tokenizer.model")
    model = tiny_model(sample)
    one = ValidationSet(cfg, tokenizer, 32, 16, rank=0, world_size=1)
    assert one.rows == {"text": 6, "interleaved": 6}
    record = one.loss(model, torch.device("cpu"))

    rows = one_row_batches(one)
    assert len(rows) == 12
    total, labelled = direct_loss(model, rows)
    assert record["val_labelled_tokens"] == labelled
    assert record["val_loss"] == pytest.approx(total / labelled, rel=1e-5)
    text = direct_loss(model, [r for r in rows if r.corpora == ("text",)])
    assert record["val_loss_text"] == pytest.approx(text[0] / text[1], rel=1e-5)

    # Two ranks deal the same rows between them and run as many passes each.
    halves = [ValidationSet(cfg, tokenizer, 32, 16, rank=r, world_size=2) for r in range(2)]
    assert len(halves[0].passes) == len(halves[1].passes)
    dealt = [row for half in halves for row in one_row_batches(half)]
    assert sorted(int(r.input_ids.sum()) for r in dealt) == sorted(int(r.input_ids.sum()) for r in rows)
    parts = [direct_loss(model, one_row_batches(half)) for half in halves]
    assert sum(p[0] for p in parts) / sum(p[1] for p in parts) == pytest.approx(record["val_loss"], rel=1e-5)


def test_a_validation_pass_leaves_the_random_state_and_the_training_mode(sample, process_group):
    cfg = data_config(sample, 0.2, rows=2)
    model = tiny_model(sample).train()
    validation = ValidationSet(cfg, Tokenizer(sample / "tokenizer.model"), 32, 16, rank=0, world_size=1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    validation.loss(model, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    assert model.training


def test_validation_settings_are_checked(sample):
    with pytest.raises(ConfigError, match="holdout"):
        ValidationConfig(holdout=1.0).validate("data.validation")
    with pytest.raises(ConfigError, match="not both"):
        ValidationConfig(holdout=0.1, corpora=[CorpusConfig("text", "x", 1)]).validate("data.validation")
    from kosmos.train.config import load_train_config

    recipe = REPO / "configs/train/tiny.yaml"
    with pytest.raises(ConfigError, match="train.eval_interval"):
        load_train_config(recipe, ["train.eval_interval=5", "data.validation.holdout=0"])
