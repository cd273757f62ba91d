"""The launch scripts' command lines, with the launcher itself stood in for by a script that prints
the arguments it was given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO


def launched(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "deepspeed"
    stand_in.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stand_in.chmod(0o755)
    done = subprocess.run(
        ["bash", str(REPO / script), *args],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout.splitlines()


def test_deepspeed_launcher_trains_on_one_node_without_a_hostfile(tmp_path):
    env = {k: v for k, v in os.environ.items() if k in ("HOSTFILE", "NUM_GPUS")}
    assert not env, "the test needs HOSTFILE and NUM_GPUS unset"
    code, args = launched(tmp_path, "launch/deepspeed.sh", "c.yaml", "runs/x", "train.max_steps=5", NUM_GPUS="2")
    assert code == 0
    assert "--hostfile" not in args and args[args.index("--num_gpus") + 1] == "2"
    assert args[args.index("--module") :] == [
        "--module", "kosmos", "train", "--config", "c.yaml", "--run-dir", "runs/x", "train.max_steps=5"
    ]  # fmt: skip


def test_deepspeed_launcher_reaches_the_nodes_of_a_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode7 slots=8\nnode8 slots=8\n")
    code, args = launched(tmp_path, "launch/deepspeed.sh", "c.yaml", "runs/x", HOSTFILE=str(hostfile))
    assert code == 0
    assert args[args.index("--hostfile") + 1] == str(hostfile)
    assert args[args.index("--master_addr") + 1] == "node7" and "--num_gpus" not in args
    code, _ = launched(tmp_path, "launch/deepspeed.sh", "c.yaml", "runs/x", HOSTFILE=str(tmp_path / "none"))
    assert code == 2
