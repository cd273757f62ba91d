"""How many intra-op threads a `kosmos` process computes with.

PyTorch starts one intra-op thread per core of the machine in every process. The training processes
of a node and their loader workers then run several threads per core, and threads that wait on
each other on busy cores make a step several times slower (the demo's training on 2 cores: 5x).
So every command chooses instead:

- `train.threads` of a training config, when set;
- else `OMP_NUM_THREADS`, when set (torchrun sets it to 1 for several processes per node unless it
  is already set);
- else the cores this process may run on (its CPU affinity, which `taskset`, cgroups or a scheduler
  restrict), divided among the training processes of the node (`LOCAL_WORLD_SIZE` from torchrun,
  `LOCAL_SIZE` from the DeepSpeed launcher), less one core per loader worker of this process (a
  worker computes with one thread: PyTorch's DataLoader sets it), and at least one.

The choice is printed once on stderr, by the first rank.
"""

from __future__ import annotations

import os
import sys

from kosmos.config import InputError

# The last choice printed, so that a process reports it once.
_reported: tuple[int, str] | None = None


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_ranks() -> int:
    """The training processes on this node, as the launcher says (1 without one)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return 1


def default_threads(cores: int, ranks: int, workers: int) -> int:
    """The cores of one rank, less one per loader worker; at least one."""
    return max(1, cores // max(1, ranks) - workers)


def _environment_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    first = value.split(",")[0]  # OpenMP also takes one count per nesting level: "4,2"
    if not first.isdigit() or int(first) < 1:
        raise InputError(f"OMP_NUM_THREADS={value!r}: expected a number of threads of at least 1")
    return int(first)


def choose_threads(workers: int = 0, setting: int | None = None) -> tuple[int, str]:
    """The number of intra-op threads and why: `setting` (`train.threads`), `OMP_NUM_THREADS`, or
    the affinity shared among ranks and loader workers."""
    if setting is not None:
        return setting, "train.threads"
    explicit = _environment_threads()
    if explicit is not None:
        return explicit, "OMP_NUM_THREADS"
    cores, ranks = available_cores(), local_ranks()
    reason = (
        f"{_count(cores, 'core')} in this process's affinity, {_count(ranks, 'rank')} on this node, "
        f"{_count(workers, 'loader worker')}"
    )
    return default_threads(cores, ranks, workers), reason


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def configure_threads(workers: int = 0, setting: int | None = None) -> int:
    """Set torch's intra-op threads for a command (see the module's docstring); returns the number."""
    global _reported
    import torch

    threads, reason = choose_threads(workers, setting)
    torch.set_num_threads(threads)
    if _reported != (threads, reason) and os.environ.get("RANK", "0") == "0":
        print(f"kosmos: {_count(threads, 'intra-op thread')} ({reason})", file=sys.stderr, flush=True)
    _reported = (threads, reason)
    return threads
