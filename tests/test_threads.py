"""The intra-op threads every command chooses: from the CPU affinity, the ranks of the node and the
loader workers, unless `OMP_NUM_THREADS` or `train.threads` says."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from kosmos import threads
from kosmos.cli import main
from kosmos.config import ConfigError, InputError
from kosmos.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
CORES = sorted(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(len(CORES) < 2, reason="needs a CPU affinity of two cores or more")


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    """Each test starts from a clean environment and gives back the affinity and thread count it found."""
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_reported", None)
    before = torch.get_num_threads()
    yield
    os.sched_setaffinity(0, CORES)
    torch.set_num_threads(before)


@contextlib.contextmanager
def affinity(cores: int):
    os.sched_setaffinity(0, CORES[:cores])
    try:
        yield
    finally:
        os.sched_setaffinity(0, CORES)


@pytest.mark.parametrize(
    ("cores", "ranks", "workers", "expected"),
    [(1, 1, 0, 1), (2, 1, 0, 2), (2, 2, 0, 1), (2, 1, 1, 1), (2, 1, 2, 1), (16, 2, 2, 6), (16, 8, 0, 2), (4, 8, 0, 1)],
)
def test_default_shares_the_cores_among_ranks_and_workers(cores, ranks, workers, expected):
    assert threads.default_threads(cores, ranks, workers) == expected


@needs_two_cores
@pytest.mark.parametrize("launcher_variable", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])
def test_threads_follow_the_affinity_and_the_ranks_of_the_node(monkeypatch, launcher_variable):
    with affinity(1):
        assert threads.configure_threads() == 1 == torch.get_num_threads()
    with affinity(2):
        assert threads.configure_threads() == 2 == torch.get_num_threads()
        assert threads.configure_threads(workers=1) == 1 == torch.get_num_threads()
        monkeypatch.setenv(launcher_variable, "2")
        assert threads.configure_threads() == 1 == torch.get_num_threads()


@needs_two_cores
def test_omp_num_threads_and_the_config_key_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with affinity(1):
        assert threads.configure_threads(workers=2) == 3 == torch.get_num_threads()
        assert threads.configure_threads(workers=2, setting=2) == 2 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with affinity(2):
        assert threads.configure_threads() == 1 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(InputError, match="OMP_NUM_THREADS"):
        threads.configure_threads()


def test_the_choice_is_printed_once_by_the_first_rank(capsys, monkeypatch):
    with affinity(1):
        threads.configure_threads()
        threads.configure_threads()
    assert capsys.readouterr().err.splitlines() == [
        "kosmos: 1 intra-op thread (1 core in this process's affinity, 1 rank on this node, 0 loader workers)"
    ]
    monkeypatch.setattr(threads, "_reported", None)
    monkeypatch.setenv("RANK", "1")
    threads.configure_threads()
    assert capsys.readouterr().err == ""


def test_a_loader_worker_computes_with_one_thread():
    class Threads(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.get_num_threads()

    torch.set_num_threads(2)
    assert list(torch.utils.data.DataLoader(Threads(), batch_size=None, num_workers=1)) == [1]


@needs_two_cores
def test_kosmos_train_leaves_a_core_to_each_loader_worker(monkeypatch, tmp_path):
    """The command's wiring: the config's loader workers and `train.threads` reach the choice."""
    seen = []
    monkeypatch.setattr("kosmos.train.trainer.train", lambda *args: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.setattr("kosmos.train.config.input_problems", lambda *args, **kwargs: [])  # no sample/ needed
    config = str(REPO / "configs/train/tiny.yaml")
    with affinity(2):
        for workers, setting, expected in ((0, "null", 2), (1, "null", 1), (1, "2", 2)):
            overrides = [f"data.num_workers={workers}", f"train.threads={setting}"]
            assert main(["train", "--config", config, "--run-dir", str(tmp_path), *overrides]) == 0
            assert seen.pop() == expected


def test_train_threads_must_be_positive():
    with pytest.raises(ConfigError, match="train.threads"):
        load_train_config(REPO / "configs/train/tiny.yaml", ["train.threads=0"])
