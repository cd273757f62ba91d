"""The run folder's bookkeeping without training: resume rules, the lock, the history, the LR a resume
sets, stop signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kosmos import config as config_io
from kosmos.cli import main
from kosmos.config import ConfigError
from kosmos.train.config import OptimizerConfig, TrainConfig
from kosmos.train.optim import build_lr_schedule, build_optimizer, follow_config, lr_factor
from kosmos.train.preemption import StopRequest
from kosmos.train.resume_keys import FREE_ON_RESUME
from kosmos.train.run_folder import (
    CONFIG,
    LOCK_HOLDER,
    RunFolderBusy,
    RunLock,
    read_history,
    record_launch,
    resume_changes,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config() -> TrainConfig:
    return config_io.from_dict(
        TrainConfig,
        {
            "model": config_io.read_yaml(REPO / "configs/model/tiny.yaml"),
            "tokenizer": "sample/tokenizer.model",
            "data": {"corpora": [{"kind": "text", "path": "sample/text", "tokens_per_step": 512}]},
            "optimizer": {"lr": 2e-3},
        },
    )


def changed(cfg: TrainConfig, *overrides: str) -> TrainConfig:
    return config_io.from_dict(
        TrainConfig, config_io.apply_overrides(config_io.to_dict(cfg), list(overrides))
    )


def test_a_resume_applies_free_keys_and_refuses_the_rest_unless_allowed(config, tmp_path):
    config_io.dump(config, tmp_path / CONFIG)
    free = changed(config, "train.max_steps=5000", "checkpoint.interval=50", "logging.tensorboard=false")
    assert {c.key for c in resume_changes(tmp_path, free, [])} == {
        "train.max_steps",
        "checkpoint.interval",
        "logging.tensorboard",
    }

    lower_lr = changed(config, "optimizer.lr=1e-4", "data.seed=3")
    with pytest.raises(ConfigError) as refused:
        resume_changes(tmp_path, lower_lr, ["data.seed"])
    message = str(refused.value)
    assert "optimizer.lr: 0.002 -> 0.0001" in message and "--allow-config-change" in message
    assert "data.seed" not in message  # allowed: only what is refused is listed
    changes = resume_changes(tmp_path, lower_lr, ["optimizer", "data.seed"])  # a section allows its keys
    assert [(c.key, c.old, c.new) for c in changes] == [("data.seed", 0, 3), ("optimizer.lr", 0.002, 1e-4)]

    with pytest.raises(ConfigError, match="optimiser.lr is not a config key"):
        resume_changes(tmp_path, lower_lr, ["optimiser.lr"])


def test_train_help_lists_every_key_a_resume_changes_freely(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_of_option = text.split("--allow-config-change KEY", 2)[2].split("--dry-run")[0]
    for key in FREE_ON_RESUME:
        assert (key + "*" if key.endswith(".") else key) in help_of_option


def test_a_model_of_another_shape_is_refused_even_when_allowed(config, tmp_path):
    config_io.dump(config, tmp_path / CONFIG)
    with pytest.raises(ConfigError, match=r"model\.text\.width"):
        resume_changes(tmp_path, changed(config, "model.text.width=64"), [])
    with pytest.raises(ConfigError, match="another shape"):
        resume_changes(tmp_path, changed(config, "model.text.width=64"), ["model"])
    # A change that leaves every parameter's shape alone can be allowed.
    dropout = changed(config, "model.text.dropout=0.1")
    assert [c.key for c in resume_changes(tmp_path, dropout, ["model.text.dropout"])] == [
        "model.text.dropout"
    ]


def test_keys_only_one_version_of_the_config_has_are_recorded_not_refused(config, tmp_path):
    saved = config_io.to_dict(config)
    saved["train"]["retired_setting"] = "x"
    (tmp_path / CONFIG).write_text(json.dumps(saved))  # JSON is YAML
    changes = resume_changes(tmp_path, config, [])
    assert [(c.key, c.new) for c in changes] == [("train.retired_setting", "(absent)")]


def test_each_launch_writes_its_config_and_appends_to_the_history(config, tmp_path):
    record_launch(tmp_path, config, [], 0, None, ranks=1)
    lower = changed(config, "optimizer.lr=1e-4")
    record_launch(tmp_path, lower, resume_changes(tmp_path, lower, ["optimizer.lr"]), 40, "checkpoints/x", 1)
    assert config_io.read_yaml(tmp_path / CONFIG)["optimizer"]["lr"] == 1e-4
    first, second = read_history(tmp_path)
    assert first["config"]["optimizer"]["lr"] == 2e-3 and second["config"]["optimizer"]["lr"] == 1e-4
    assert second["config_changes"] == {"optimizer.lr": {"old": 0.002, "new": 0.0001}}
    assert (second["start_step"], second["resumed_from"]) == (40, "checkpoints/x")
    assert (
        second["command"] == sys.argv
        and second["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    )
    if (REPO / ".git").exists():
        assert len(second["git"]["commit"]) == 40


def test_no_credential_of_a_corpus_url_is_written_and_a_resume_sees_no_change(config, tmp_path, monkeypatch):
    secret = "https://reader:hunter2@data.example/laion?X-Amz-Signature=hunter3"
    cfg = changed(config, f"data.corpora.0.path={secret}")
    monkeypatch.setattr(sys, "argv", ["kosmos", "train", f"data.corpora.0.path={secret}"])
    record_launch(tmp_path, cfg, [], 0, None, ranks=1)
    assert resume_changes(tmp_path, cfg, []) == []
    record_launch(tmp_path, cfg, [], 10, "checkpoints/x", ranks=1)
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert "hunter2" not in written and "hunter3" not in written and "reader" not in written
    assert config_io.read_yaml(tmp_path / CONFIG)["data"]["corpora"][0]["path"] == "https://data.example/laion"


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kosmos.train.run_folder import RunLock
    lock = RunLock(Path(sys.argv[1]))
    lock.acquire()
    print("holding", flush=True)
    time.sleep(600)
    """
)


def test_one_writer_at_a_time_and_a_dead_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunFolderBusy, match=f"process {holder.pid} on "):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert (run_dir / LOCK_HOLDER).is_file()  # left behind by the dead holder
    lock = RunLock(run_dir)
    lock.acquire()
    assert json.loads((run_dir / LOCK_HOLDER).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_HOLDER).exists()


def test_a_folder_created_by_a_launch_that_wrote_nothing_is_removed(tmp_path):
    lock = RunLock(tmp_path / "fresh")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "kept").mkdir()
    lock = RunLock(tmp_path / "kept")
    lock.acquire()
    lock.release()
    assert (tmp_path / "kept").is_dir()


def test_a_restored_schedule_follows_the_configured_lr(tiny_config):
    from kosmos.model import KosmosModel

    model = KosmosModel(tiny_config)
    old = OptimizerConfig(lr=1e-3, warmup_steps=2, weight_decay=0.01)
    optimizer = build_optimizer(model, old, offload=False)
    schedule = build_lr_schedule(optimizer, old, total_steps=10)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    saved = optimizer.state_dict(), schedule.state_dict()

    new = OptimizerConfig(lr=1e-4, warmup_steps=2, weight_decay=0.05, betas=(0.9, 0.95))
    optimizer = build_optimizer(model, old, offload=False)  # as the old run built it
    schedule = build_lr_schedule(optimizer, new, total_steps=20)
    optimizer.load_state_dict(saved[0])
    schedule.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] != pytest.approx(1e-4 * lr_factor(4, 2, 20))
    follow_config(schedule, new)
    decay, no_decay = optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1e-4 * lr_factor(4, 2, 20))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decay["betas"] == (0.9, 0.95)
    optimizer.step()
    schedule.step()
    assert decay["lr"] == pytest.approx(1e-4 * lr_factor(5, 2, 20))


def test_first_ctrl_c_asks_for_a_stop_and_a_second_aborts():
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs between bytecodes of the main thread
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is before
