"""End-to-end training runs on the sample corpus: exact resume under ZeRO-2/3 on two ranks, two
simulated nodes, a save killed halfway, non-finite steps, pre-emption signals, the trainable set,
validation passes.

Every run is a real `kosmos train` process (under torchrun where there are several ranks) with the
tiny model cut to two layers and short sequences.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import session_processes

from kosmos.checkpoint import consolidated_state_dict, load_model_from_checkpoint
from kosmos.data.build import build_instruction
from kosmos.data.sample import NUMBER_WORDS, build_sample
from kosmos.model import KosmosModel, load_model_config
from kosmos.train.checkpoint import checkpoint_tag
from kosmos.train.optim import lr_factor
from kosmos.train.run_folder import read_history

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.text.layers=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "sample"
    build_sample(out)
    return out


@pytest.fixture
def recipe(sample, tmp_path) -> Path:
    """Two micro-batches of two 128-token rows per rank and step (one with two ranks)."""
    corpora = [
        {"kind": kind, "path": str(sample / kind), "tokens_per_step": tokens}
        for kind, tokens in (("text", 256), ("caption", 512), ("interleaved", 256))
    ]
    path = tmp_path / "train.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(REPO / "configs/model/tiny.yaml"),
                "tokenizer": str(sample / "tokenizer.model"),
                "data": {"seq_len": 128, "micro_batch_size": 2, "num_workers": 0, "corpora": corpora},
                "train": {"max_steps": 20, "log_interval": 1, "seed": 7},
                "optimizer": {"lr": 2.0e-3, "warmup_steps": 5},
                "checkpoint": {"interval": 10, "keep": 3},
                "logging": {"tensorboard": False, "progress_bar": False},
            }
        )
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(
    recipe: Path, run_dir: Path, *overrides: str, ranks: int = 1, launcher: str = "torchrun"
) -> list[str]:
    command = [sys.executable]
    if ranks > 1 and launcher == "torchrun":
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    elif ranks > 1:  # the deepspeed launcher
        command += ["-m", "deepspeed.launcher.runner", f"--num_gpus={ranks}", f"--master_port={free_port()}"]
        command += ["--no_local_rank", "--module"]
    else:
        command += ["-m"]
    command += ["kosmos", "train", "--config", str(recipe), "--run-dir", str(run_dir)]
    return [*command, *SMALL, *overrides]


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, env=ENV, timeout=timeout)


def metrics(run_dir: Path, key: str = "loss") -> dict[int, dict]:
    """The training records (or those holding `key`: "val_loss") by step; a step has at most one."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    found = [record for record in map(json.loads, lines) if key in record]
    assert len(found) == len({record["step"] for record in found})
    return {record["step"]: record for record in found}


def assert_same_steps(first: dict, second: dict, steps: range) -> None:
    """The logged losses, gradient norm, LR and tokens of `steps` are identical in both runs."""
    keys = ("loss", "loss_text", "loss_caption", "loss_interleaved", "grad_norm", "lr", "tokens_seen")
    for step in steps:
        for key in keys:
            assert second[step][key] == first[step][key], (step, key)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(run_dir / "checkpoints" / checkpoint_tag(step))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_resume_exactly(recipe, tmp_path, stage):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    zero = f"deepspeed.zero_stage={stage}"
    result = run(train_command(recipe, straight, zero, ranks=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (straight / "checkpoints").glob("step_*")) == [
        checkpoint_tag(10),
        checkpoint_tag(20),
    ]

    # A run that stopped after its step-10 checkpoint (nothing of steps 11-20 exists yet), resumed
    # under the deepspeed launcher this time.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        straight / "checkpoints" / checkpoint_tag(10), resumed / "checkpoints" / checkpoint_tag(10)
    )
    (resumed / "checkpoints" / "latest").write_text(checkpoint_tag(10))
    result = run(train_command(recipe, resumed, zero, ranks=2, launcher="deepspeed"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr

    first, second = metrics(straight), metrics(resumed)
    assert sorted(second) == list(range(11, 21))
    assert_same_steps(first, second, range(11, 21))

    # The tiny model learns.
    losses = [first[s]["loss"] for s in range(1, 21)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0

    # DeepSpeed optimizes exactly the model's trainable parameters; frozen ones never move from
    # their initial values (the trainer seeds with train.seed before building the model).
    torch.manual_seed(7)
    model = KosmosModel(load_model_config(straight / "checkpoints" / checkpoint_tag(10) / "model.yaml"))
    trainable = set(model.trainable_parameter_names())
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(
        dict(model.named_parameters())
    )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    optimized = get_fp32_state_dict_from_zero_checkpoint(
        str(straight / "checkpoints"), tag=checkpoint_tag(20), exclude_frozen_parameters=True
    )
    assert set(optimized) == trainable | tied  # tied: the LM head shares embed_tokens' weight
    before, after = model.state_dict(), weights(straight, 20)
    assert set(after) == set(before)
    for name in before:
        if name in trainable | tied:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_two_nodes_train_and_checkpoint(recipe, tmp_path):
    """launch/torchrun.sh started twice, as on two nodes, meeting through a loopback c10d rendezvous."""
    run_dir = tmp_path / "run"
    env = {
        **ENV,
        "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}",
        "NNODES": "2",
        "GPUS_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": "two-nodes",
    }
    command = [str(REPO / "launch/torchrun.sh"), str(recipe), str(run_dir), *SMALL]
    command += ["train.max_steps=4", "checkpoint.interval=2", "deepspeed.zero_stage=2"]
    nodes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert latest(run_dir) == checkpoint_tag(4)
    checkpoint = run_dir / "checkpoints" / checkpoint_tag(4)
    assert len(list(checkpoint.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert sorted(metrics(run_dir)) == [1, 2, 3, 4]
    model, tokenizer, _ = load_model_from_checkpoint(run_dir)
    assert tokenizer.vocab_size == model.cfg.text.vocab_size


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    save = torch.save
    def save_then_die(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if "step_00000004" in str(path):  # the first file of the step-4 checkpoint is written
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die
    from kosmos.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_save_killed_halfway_keeps_the_previous_checkpoint(recipe, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(recipe), "--run-dir", str(run_dir), *SMALL]
    args += ["train.max_steps=6", "checkpoint.interval=2", "checkpoint.keep=2"]
    result = run([sys.executable, "-c", KILL_DURING_SAVE, *args])
    assert result.returncode == -signal.SIGKILL
    assert latest(run_dir) == checkpoint_tag(2)
    assert (run_dir / "checkpoints" / (checkpoint_tag(4) + ".partial")).is_dir()
    load_model_from_checkpoint(run_dir)  # the previous checkpoint is whole

    result = run([sys.executable, "-m", "kosmos", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoints/{checkpoint_tag(2)} at step 2" in result.stdout + result.stderr
    assert latest(run_dir) == checkpoint_tag(6)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        checkpoint_tag(4),
        checkpoint_tag(6),
    ]
    assert sorted(metrics(run_dir)) == [1, 2, 3, 4, 5, 6]  # steps 3-4 logged once, by the resumed run


POISON_STEPS = textwrap.dedent(
    """
    import sys
    from kosmos.model import KosmosModel
    from kosmos.train.trainer import Trainer
    BAD = {3, 4} | set(range(7, 100))
    current = {"step": 0}
    train_step, forward = Trainer._train_step, KosmosModel.forward
    def counting_step(self, micro_batches):
        current["step"] = self.state.step + 1
        return train_step(self, micro_batches)
    def poisoned_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if current["step"] in BAD:
            output.token_loss = output.token_loss * float("nan")
        return output
    Trainer._train_step, KosmosModel.forward = counting_step, poisoned_forward
    from kosmos.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_nonfinite_steps_are_skipped_and_a_run_of_them_stops(recipe, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(recipe), "--run-dir", str(run_dir), *SMALL]
    args += [
        "train.max_steps=20",
        "train.max_nonfinite_steps=3",
        "checkpoint.interval=2",
        "checkpoint.keep=10",
        "deepspeed.zero_stage=1",
    ]
    result = run([sys.executable, "-c", POISON_STEPS, *args])
    assert result.returncode == 1
    assert "3 consecutive steps up to step 9" in result.stdout + result.stderr
    records = metrics(run_dir)
    assert records[4]["skipped_nonfinite_steps"] == 2 and records[6]["skipped_nonfinite_steps"] == 2
    assert records[9]["skipped_nonfinite_steps"] == 5
    assert records[5]["loss"] is not None and records[9]["loss"] is None
    # Skipped steps leave the weights alone; the last checkpoint holds the weights before the run.
    assert latest(run_dir) == checkpoint_tag(8)
    w2, w4, w6, w8 = (weights(run_dir, s) for s in (2, 4, 6, 8))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)
    assert not all(torch.equal(w4[k], w6[k]) for k in w4)
    assert all(torch.equal(w6[k], w8[k]) for k in w6)
    assert all(torch.isfinite(t).all() for t in w8.values() if t.is_floating_point())
    load_model_from_checkpoint(run_dir)  # ZeRO-1 keeps frozen weights outside the optimizer shards


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def test_preemption_signal_to_every_process_checkpoints_and_exits_cleanly(recipe, tmp_path):
    """As under SLURM (launch/slurm.sbatch): SIGTERM reaches torchrun, both ranks and their loader workers."""
    run_dir = tmp_path / "run"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--signals-to-handle",
        "SIGINT",
        "--standalone",
    ]
    command = [
        *torchrun, "--nproc_per_node=2", "-m", "kosmos", "train", "--config", str(recipe), "--run-dir", str(run_dir),
        *SMALL, "train.max_steps=500", "checkpoint.interval=1000", "data.num_workers=2",
    ]  # fmt: skip
    process = subprocess.Popen(
        ["bash", "-c", 'trap "" USR1 TERM; exec "$@"', "_", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    for pid in process_tree(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    stopped = max(metrics(run_dir))
    assert 1 < stopped < 500
    assert f"stopped at step {stopped} by SIGTERM" in output
    assert latest(run_dir) == checkpoint_tag(stopped)
    load_model_from_checkpoint(run_dir)


def test_instruction_tuning_starts_from_the_pretrained_weights(recipe, tmp_path):
    pretrained, tuned = tmp_path / "pretrained", tmp_path / "tuned"
    result = run(train_command(recipe, pretrained, "train.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]

    triples = [
        {"instruction": "Write the digit as a word.", "input": str(d), "output": word}
        for d, word in enumerate(NUMBER_WORDS)
    ]
    (tmp_path / "triples.jsonl").write_text("\n".join(json.dumps(t) for t in triples))
    build_instruction([tmp_path / "triples.jsonl"], tmp_path / "instructions")
    mixture = yaml.safe_load(recipe.read_text())
    mixture["data"]["corpora"].append(
        {"kind": "instruction", "path": str(tmp_path / "instructions"), "tokens_per_step": 256}
    )
    (tmp_path / "instruct.yaml").write_text(yaml.safe_dump(mixture))
    # With a zero learning rate the tuned weights stay exactly the pretrained ones.
    overrides = [f"train.init_from={pretrained}", "train.max_steps=1", "optimizer.lr=0.0"]
    result = run(train_command(tmp_path / "instruct.yaml", tuned, *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"initialised the weights from {pretrained / 'checkpoints' / checkpoint_tag(2)}"
        in result.stdout + result.stderr
    )
    before, after = weights(pretrained, 2), weights(tuned, 1)
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = metrics(tuned)[1]
    assert record["loss_instruction"] > 0 and record["tokens_instruction"] > 0


CRASH_IN_STEP_3 = textwrap.dedent(
    """
    import sys
    from kosmos.train.trainer import Trainer
    train_step = Trainer._train_step
    def failing_step(self, micro_batches):
        if self.state.step == 2:
            raise RuntimeError("planted failure in step 3")
        return train_step(self, micro_batches)
    Trainer._train_step = failing_step
    from kosmos.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_crash_with_loader_workers_exits_with_its_error(recipe, tmp_path):
    args = [
        "train",
        "--config",
        str(recipe),
        "--run-dir",
        str(tmp_path / "run"),
        *SMALL,
        "data.num_workers=2",
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", CRASH_IN_STEP_3, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=240)  # a hang fails here
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1, stderr[-3000:]
    assert "RuntimeError: planted failure in step 3" in stderr
    time.sleep(1)
    assert session_processes(process.pid) == []  # no loader worker outlives the run


def test_ctrl_c_checkpoints_and_the_resume_is_bit_identical(recipe, tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    # A warm-up longer than any of these runs: the LR does not depend on train.max_steps.
    common = ["data.num_workers=2", "optimizer.warmup_steps=1000", "checkpoint.interval=1000"]
    process = subprocess.Popen(
        train_command(recipe, interrupted, *common, "train.max_steps=500"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        log = interrupted / "metrics.jsonl"
        while not (log.is_file() and log.read_text().strip()):
            assert process.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        holder = json.loads((interrupted / ".lock.holder").read_text())
        assert (holder["pid"], holder["host"]) == (process.pid, socket.gethostname())
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process, workers included
        output = process.communicate(timeout=120)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert not (interrupted / ".lock.holder").exists()  # released
    stopped = max(metrics(interrupted))
    assert f"stopped at step {stopped} by SIGINT" in output and "Traceback" not in output
    assert latest(interrupted) == checkpoint_tag(stopped)

    end = stopped + 3
    for run_dir in (interrupted, straight):
        result = run(train_command(recipe, run_dir, *common, f"train.max_steps={end}"))
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = metrics(straight), metrics(interrupted)
    assert sorted(second) == list(range(1, end + 1))
    assert_same_steps(first, second, range(1, end + 1))
    before, after = weights(straight, end), weights(interrupted, end)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_resume_with_another_lr_is_refused_unless_allowed_and_then_recorded(recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = run(train_command(recipe, run_dir, "train.max_steps=4", "checkpoint.interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()

    more = ["train.max_steps=6", "checkpoint.interval=2"]
    refused = run(train_command(recipe, run_dir, *more, "optimizer.lr=1e-3"))
    assert refused.returncode == 2
    assert "optimizer.lr: 0.002 -> 0.001" in refused.stderr and "--allow-config-change" in refused.stderr
    wider = run(
        train_command(recipe, run_dir, *more, "model.text.width=64", "--allow-config-change", "model")
    )
    assert wider.returncode == 2 and "another shape" in wider.stderr
    for result in (refused, wider):
        assert "Traceback" not in result.stderr
    assert (run_dir / "config.yaml").read_text() == config  # nothing was written
    assert len(read_history(run_dir)) == 1 and max(metrics(run_dir)) == 4

    allow = ["optimizer.lr=1e-3", "--allow-config-change", "optimizer.lr"]
    allowed = run(train_command(recipe, run_dir, *more, *allow))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == 1e-3
    first, second = read_history(run_dir)
    assert (first["start_step"], first["resumed_from"], first["config"]["optimizer"]["lr"]) == (0, None, 2e-3)
    assert (second["start_step"], second["resumed_from"]) == (4, f"checkpoints/{checkpoint_tag(4)}")
    assert second["config_changes"] == {
        "optimizer.lr": {"old": 2e-3, "new": 1e-3},
        "train.max_steps": {"old": 4, "new": 6},
    }
    assert "kosmos" in second["command"][0] and "optimizer.lr=1e-3" in second["command"]
    # The new peak LR drives the schedule from the first resumed step (warm-up of 5 steps, end at 6).
    records = metrics(run_dir)
    assert records[4]["lr"] == pytest.approx(2e-3 * lr_factor(3, 5, 4))
    assert records[5]["lr"] == pytest.approx(1e-3 * lr_factor(4, 5, 6))


HOLD_RUN_FOLDER = textwrap.dedent(
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


def test_a_second_training_on_a_folder_in_use_is_refused(recipe, tmp_path):
    """The first training is stood in for by a process holding the lock as training does (the
    Ctrl-C test checks that a training holds it)."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RUN_FOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        second = run(train_command(recipe, run_dir))
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    assert f"{run_dir} is in use by process {holder.pid} on {socket.gethostname()}" in second.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", ".lock.holder"]  # nothing written


def test_a_launch_refused_after_locking_a_new_folder_leaves_nothing(recipe, tmp_path):
    run_dir = tmp_path / "run"
    (tmp_path / "empty").mkdir()  # exists, so the checks before locking pass; holds no checkpoint
    result = run(train_command(recipe, run_dir, f"train.init_from={tmp_path / 'empty'}"))
    assert result.returncode == 2 and "is neither a run folder" in result.stderr, result.stderr[-2000:]
    assert not run_dir.exists()


# Dropout on, so that a validation pass that moved the random state would change the training.
NINE_STEPS = ["train.max_steps=9", "checkpoint.interval=4", "model.text.dropout=0.1"]


def test_training_is_bit_identical_with_validation_and_a_resume_keeps_its_points(recipe, sample, tmp_path):
    plain, validated, resumed = tmp_path / "plain", tmp_path / "validated", tmp_path / "resumed"
    validation = [
        "train.eval_interval=4",
        f"data.validation.corpora=[{{kind: caption, path: {sample / 'caption'}, tokens_per_step: 1}}]",
        "data.validation.rows=4",
    ]
    result = run(train_command(recipe, plain, *NINE_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run(train_command(recipe, validated, *NINE_STEPS, *validation))
    assert result.returncode == 0, result.stderr[-3000:]
    # The training records are the same to the bit.
    assert_same_steps(metrics(plain), metrics(validated), range(1, 10))
    points = metrics(validated, "val_loss")
    assert sorted(points) == [4, 8, 9]  # every eval_interval steps, and the end
    assert points[9]["val_loss"] < points[4]["val_loss"]

    # Resumed from the step-4 checkpoint: points 8 and 9 again, once each, with the same values.
    (resumed / "checkpoints").mkdir(parents=True)
    tag = checkpoint_tag(4)
    shutil.copytree(validated / "checkpoints" / tag, resumed / "checkpoints" / tag)
    (resumed / "checkpoints" / "latest").write_text(checkpoint_tag(4))
    result = run(train_command(recipe, resumed, *NINE_STEPS, *validation))
    assert result.returncode == 0, result.stderr[-3000:]
    again = metrics(resumed, "val_loss")
    assert sorted(again) == [8, 9]
    for step in (8, 9):
        assert again[step]["val_loss"] == points[step]["val_loss"]


# Poisoned data: the documents of the data steps PLANTED (numbered as the loader hands them out) make
# every step that trains on them spike, wherever they are read.
POISONED_DATA = textwrap.dedent(
    """
    import sys
    from kosmos.model import KosmosModel
    from kosmos.train.trainer import Trainer
    PLANTED = set(range(int(sys.argv.pop(1)), int(sys.argv.pop(1))))
    poisoned, current = set(), {"bad": False}
    train_step, forward = Trainer._train_step, KosmosModel.forward
    def judged_step(self, micro_batches):
        documents = set(self.loader.last_step_samples)
        if self.loader.step in PLANTED:
            poisoned.update(documents)
        current["bad"] = bool(documents & poisoned)
        return train_step(self, micro_batches)
    def poisoned_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if current["bad"]:
            output.token_loss = output.token_loss * 4
        return output
    Trainer._train_step, KosmosModel.forward = judged_step, poisoned_forward
    from kosmos.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)
SPIKES = [
    "train.max_steps=10",
    "checkpoint.interval=4",
    "train.spike.enabled=true",
    "train.spike.window=3",
    "train.spike.max_rollbacks=2",
]


def spiking_run(recipe: Path, run_dir: Path, planted: range) -> subprocess.CompletedProcess:
    args = ["train", "--config", str(recipe), "--run-dir", str(run_dir), *SMALL, *SPIKES]
    return run([sys.executable, "-c", POISONED_DATA, str(planted.start), str(planted.stop), *args])


def test_a_planted_spike_is_rolled_back_past_its_data_and_the_run_finishes(recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = spiking_run(recipe, run_dir, range(6, 7))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rolled back to step_00000004" in result.stdout + result.stderr
    # Each step once, on the path after the rollback; the rollback's record in the log and the history.
    records = metrics(run_dir)
    assert sorted(records) == list(range(1, 11))
    assert all(r["loss"] < 10 for r in records.values())
    (rollback,) = metrics(run_dir, "event").values()
    assert (rollback["step"], rollback["spike_step"]) == (4, 6)
    assert rollback["checkpoint"] == "checkpoints/" + checkpoint_tag(4)
    assert rollback["data_steps_passed_over"] == [5, 6]
    passed_over = sum(rollback["samples_passed_over"].values())
    assert passed_over > 0 and set(rollback["samples_passed_over"]) <= {"text", "caption", "interleaved"}
    assert records[10]["skipped_samples"]["rolled_back"] == passed_over
    assert [h["event"] for h in read_history(run_dir) if "event" in h] == ["rollback"]


def test_a_run_that_keeps_spiking_stops_after_the_allowed_rollbacks(recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = spiking_run(recipe, run_dir, range(6, 100))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "after 2 rollbacks (train.spike.max_rollbacks 2)" in error and "step_00000004" in error
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rollbacks = [r for r in map(json.loads, lines) if r.get("event") == "rollback"]
    assert [(r["step"], r["spike_step"], r["rollbacks"]) for r in rollbacks] == [(4, 6, 1), (4, 5, 2)]


def eval_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kosmos", "eval", "--tasks", "digits_vqa", "--limit", "8", *args]


def test_the_watcher_evaluates_each_checkpoint_once_as_kosmos_eval_does(recipe, sample, tmp_path):
    run_dir = tmp_path / "run"
    result = run(train_command(recipe, run_dir, "train.max_steps=4", "checkpoint.interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    watching = eval_command("--watch", str(run_dir), "--data-root", str(sample), "--poll", "0")
    result = run(watching)  # returns once the run's last step is evaluated
    assert result.returncode == 0, result.stderr[-3000:]
    history = run_dir / "eval" / "history.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and all(r["task"] == "digits_vqa" for r in lines)
    # Restarted: nothing left to do, nothing written twice.
    assert run(watching).returncode == 0 and len(history.read_text().splitlines()) == 2

    direct = tmp_path / "direct"
    checkpoint = run_dir / "checkpoints" / checkpoint_tag(4)
    result = run(eval_command("--checkpoint", str(checkpoint), "--data-root", str(sample), "--out", str(direct)))
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads((direct / "results.json").read_text())["summary"]
    assert (lines[1]["metric"], lines[1]["value"], lines[1]["ci"]) == (entry["metric"], entry["value"], entry["ci"])
    assert lines[1]["checkpoint"]["sha256"] == json.loads((direct / "results.json").read_text())["checkpoint"]["sha256"]
