"""The run folder's bookkeeping: one writer at a time, what a resume may change, the launch history.

- `RunLock`: rank 0 of a launch holds `RUN/.lock` (a `filelock` lock, released by the kernel when its
  process dies, however it dies) and names itself in `RUN/.lock.holder`; a second launch on the folder
  stops with a message naming the holder.
- `resume_changes`: the requested config against the run's `config.yaml`. Keys in `FREE_ON_RESUME`
  (`kosmos.train.resume_keys`) change freely; any other change is refused, with the old and new
  values, unless allowed by name.
- `record_launch`: once a launch is accepted, `config.yaml` becomes its config and `history.jsonl`
  gets one line for it (config, changes, command line, package versions, git commit).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from kosmos import config as config_io
from kosmos.config import ConfigError, InputError, problems_of
from kosmos.data.sources import scrubbed
from kosmos.model import ModelConfig
from kosmos.train.config import TrainConfig
from kosmos.train.resume_keys import FREE_ON_RESUME, free_keys_listed

CONFIG = "config.yaml"
HISTORY = "history.jsonl"
LOCK = ".lock"
LOCK_HOLDER = ".lock.holder"

# Recorded in the history of every launch (those installed).
PACKAGES = (
    "kosmos",
    "torch",
    "deepspeed",
    "open_clip_torch",
    "transformers",
    "sentencepiece",
    "webdataset",
    "numpy",
    "pillow",
)


class RunFolderBusy(InputError):
    """Another process is training into the run folder."""


class RunLock:
    """Rank 0's hold on a run folder for the length of a launch."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created = not run_dir.exists()
        self.lock = FileLock(run_dir / LOCK, timeout=0)

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise RunFolderBusy(self._busy_message()) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        (self.run_dir / LOCK_HOLDER).write_text(json.dumps(holder) + "\n")

    def busy_problem(self) -> str | None:
        """The refusal a launch on the folder would meet now, if another process holds it; takes nothing."""
        if not (self.run_dir / LOCK).exists():
            return None
        try:
            self.lock.acquire()
        except Timeout:
            return self._busy_message()
        self.lock.release()
        return None

    def _busy_message(self) -> str:
        return (
            f"{self.run_dir} is in use by {self._holder()}; one training at a time writes a run folder "
            f"(wait for it to end, stop it, or choose another --run-dir)"
        )

    def _holder(self) -> str:
        try:
            holder = json.loads((self.run_dir / LOCK_HOLDER).read_text())
            return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
        except (OSError, ValueError, KeyError):
            return "another process (it has not named itself yet)"

    def release(self) -> None:
        """Let go of the folder; a folder this launch created and left empty is removed."""
        if not self.lock.is_locked:
            return
        (self.run_dir / LOCK_HOLDER).unlink(missing_ok=True)
        self.lock.release()
        if self.created and {p.name for p in self.run_dir.iterdir()} <= {LOCK}:
            shutil.rmtree(self.run_dir)


# -- what a resume may change --------------------------------------------------------------------


@dataclass
class Change:
    key: str
    old: Any  # MISSING where one of the two configs lacks the key (written by another kosmos version)
    new: Any


MISSING = "(absent)"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (lists are values)."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    before, after = flatten(old), flatten(new)
    return [
        Change(key, before.get(key, MISSING), after.get(key, MISSING))
        for key in sorted(before.keys() | after.keys())
        if before.get(key, MISSING) != after.get(key, MISSING)
    ]


def _covers(pattern: str, key: str) -> bool:
    """Whether `pattern` (a dotted key, or a section like `optimizer` or `optimizer.`) names `key`."""
    section = pattern.rstrip(".")
    return key == section or key.startswith(section + ".")


def is_free(key: str) -> bool:
    return any(_covers(pattern, key) for pattern in FREE_ON_RESUME)


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CONFIG
    return config_io.read_yaml(path) if path.is_file() else None


def resume_changes(run_dir: Path, cfg: TrainConfig, allowed: list[str]) -> list[Change]:
    """The changes of resuming the run in `run_dir` with `cfg`; refuses those not free nor allowed.

    A key only one of the two configs has (they were written by different versions of kosmos) is
    recorded, never refused.
    """
    # Paths compared as the absolute paths they name (a config built in code may hold relative ones).
    new = scrubbed(config_io.resolve_paths(TrainConfig, config_io.to_dict(cfg), Path.cwd()))
    keys = flatten(new)
    for pattern in allowed:
        if not any(_covers(pattern, key) for key in keys):
            raise ConfigError(f"--allow-config-change: {pattern} is not a config key or section")
    old = read_run_config(run_dir)
    if old is None:
        return []
    launches = read_history(run_dir)
    # A folder written before configs held absolute paths has them relative to its launch's folder.
    config_io.resolve_paths(TrainConfig, old, Path(launches[-1]["cwd"]) if launches else Path.cwd())
    changes = config_changes(old, new)
    refused = [
        c
        for c in changes
        if MISSING not in (c.old, c.new)
        and not is_free(c.key)
        and not any(_covers(pattern, c.key) for pattern in allowed)
    ]
    if refused:
        lines = "\n".join(f"  {c.key}: {c.old!r} -> {c.new!r}" for c in refused)
        raise ConfigError(
            f"{run_dir} has checkpoints trained with other settings; resuming would change\n{lines}\n"
            f"Allow each change with --allow-config-change KEY (a key or a section, e.g. optimizer.lr), or "
            f"train into a new --run-dir (train.init_from={run_dir} starts from these weights). A resume "
            f"changes without asking: {free_keys_listed()}"
        )
    if any(c.key.startswith("model.") for c in changes):
        _check_same_parameters(config_io.from_dict(ModelConfig, old["model"], "model"), cfg.model, run_dir)
    return changes


def _check_same_parameters(old: ModelConfig, new: ModelConfig, run_dir: Path) -> None:
    """A model change the checkpoints can still load: the same parameter names and shapes."""
    import torch

    from kosmos.model import KosmosModel

    def shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            # No weights are read: the shapes are the config's, and the CLIP file may have moved.
            vision = dataclasses.replace(model_cfg.vision, weights=None)
            model = KosmosModel(dataclasses.replace(model_cfg, vision=vision))
        return {name: tuple(p.shape) for name, p in model.state_dict().items()}

    before, after = shapes(old), shapes(new)
    differ = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    if differ:
        listed = ", ".join(f"{n} {before.get(n, MISSING)} -> {after.get(n, MISSING)}" for n in differ[:3])
        raise ConfigError(
            f"model: the checkpoints in {run_dir} hold a model of another shape ({len(differ)} parameters "
            f"differ: {listed}{', ...' if len(differ) > 3 else ''}); they cannot be resumed with this model. "
            f"Train into a new --run-dir instead"
        )


def trained_steps(run_dir: Path) -> int | None:
    """The step of the run's latest checkpoint (its tag in `checkpoints/latest`, `step_N`), if any."""
    latest = run_dir / "checkpoints" / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    return int(tag.removeprefix("step_")) if tag.removeprefix("step_").isdigit() else None


def launch_problems(run_dir: Path, cfg: TrainConfig, allowed: list[str]) -> list[str]:
    """What would refuse a launch on `run_dir` with `cfg`, found without a model: the folder in use
    by another process, a resume changing keys it may not change."""
    problems = []
    busy = RunLock(run_dir).busy_problem()
    if busy is not None:
        problems.append(busy)
    if trained_steps(run_dir) is not None:
        try:
            resume_changes(run_dir, cfg, allowed)
        except ConfigError as error:
            problems += problems_of(error)
    return problems


# -- the history of launches ---------------------------------------------------------------------


def record_launch(
    run_dir: Path,
    cfg: TrainConfig,
    changes: list[Change],
    start_step: int,
    resumed_from: str | None,
    ranks: int,
) -> None:
    """Write the launch's config to `config.yaml` and append its line to `history.jsonl`; URLs in
    either are written without user info or query (credentials come from the environment)."""
    partial = run_dir / (CONFIG + ".tmp")
    partial.write_text(yaml.safe_dump(scrubbed(config_io.to_dict(cfg)), sort_keys=False))
    os.replace(partial, run_dir / CONFIG)  # a launch that dies here leaves the previous config whole
    record = {
        "time": _now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": sys.argv,
        "cwd": os.getcwd(),
        "ranks": ranks,
        "start_step": start_step,
        "resumed_from": resumed_from,
        "config_changes": {c.key: {"old": c.old, "new": c.new} for c in changes},
        "versions": package_versions(),
        "git": git_commit(),
        "config": config_io.to_dict(cfg),
    }
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(scrubbed(record)) + "\n")


def record_event(run_dir: Path, record: dict[str, Any]) -> None:
    """Append an event of the run (a rollback) to `history.jsonl`, between its launches."""
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps({"time": _now(), **record}) + "\n")


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> dict[str, Any] | None:
    """The commit of the kosmos source tree, when it is a git checkout; `dirty` if it has local edits."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        commit = _git(source, "rev-parse", "HEAD")
        status = _git(source, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status)}


def _git(source: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
