"""Threads per rank: how many intra-op and inter-op threads each rank of a job runs.

Several ranks on one node each running one thread per core of the node oversubscribe it many
times over, so every launcher decides the count from the cores it was given and hands it to its
ranks in the environment (``OMP_NUM_THREADS`` and ``TWOTOWER_THREADS_PER_RANK``); each rank
applies it when it starts (``trainer.runtime.distributed.init_distributed``). The choice, first
match wins:

1. ``--threads-per-rank N`` of ``twotower launch local`` / ``twotower launch slurm``;
2. SLURM's ``--cpus-per-task`` (``SLURM_CPUS_PER_TASK`` on the node): the cores of one task;
3. the cores this process may run on divided by the ranks on its node, at least 1.

A process that no launcher configured (a bare ``python -m trainer.train``, a plain ``torchrun``)
makes the same choice itself, counting the ranks on its node from ``LOCAL_WORLD_SIZE`` (which
torchrun sets; 1 for a bare process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

THREADS_ENV = "TWOTOWER_THREADS_PER_RANK"
# Where the launcher's number came from, for the rank's start-up log line.
SOURCE_ENV = "TWOTOWER_THREADS_SOURCE"
OVERRIDE_FLAG = "--threads-per-rank"


@dataclass(frozen=True)
class ThreadChoice:
    """Threads per rank and where the number came from.

    Args:
        threads: intra-op and inter-op threads of each rank (>= 1).
        source: what decided it, for the log (``"--threads-per-rank"``, ``"16 cores / 2 ranks
            per node"``).
    """

    threads: int
    source: str


def choose_threads(
    cores: int,
    ranks_per_node: int,
    cpus_per_task: int | None = None,
    override: int | None = None,
) -> ThreadChoice:
    """The threads of each rank: ``override``, else ``cpus_per_task``, else
    ``cores // ranks_per_node`` (at least 1).

    Args:
        cores: cores this process may run on (its CPU affinity).
        ranks_per_node: ranks sharing those cores.
        cpus_per_task: SLURM's ``--cpus-per-task``; None where SLURM gave no count.
        override: ``--threads-per-rank``; None to decide from the cores.

    Raises:
        ValueError: naming the flag or count that is not >= 1.
    """
    if override is not None:
        if override < 1:
            raise ValueError(f"{OVERRIDE_FLAG} must be >= 1, got {override}")
        return ThreadChoice(override, OVERRIDE_FLAG)
    if cpus_per_task is not None:
        if cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be >= 1, got {cpus_per_task}")
        return ThreadChoice(cpus_per_task, f"--cpus-per-task={cpus_per_task}")
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    if ranks_per_node < 1:
        raise ValueError(f"ranks per node must be >= 1, got {ranks_per_node}")
    rank_word = "rank" if ranks_per_node == 1 else "ranks"
    return ThreadChoice(
        max(1, cores // ranks_per_node), f"{cores} cores / {ranks_per_node} {rank_word} per node"
    )


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a cpuset, ``taskset``, SLURM's binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_environment(choice: ThreadChoice) -> dict[str, str]:
    """The variables a launcher sets for its ranks (``OMP_NUM_THREADS`` also for the OpenMP
    runtimes of other libraries, which read it when they load)."""
    threads = str(choice.threads)
    return {"OMP_NUM_THREADS": threads, THREADS_ENV: threads, SOURCE_ENV: choice.source}


def positive_env_int(environ: Mapping[str, str], name: str) -> int | None:
    """``environ[name]`` as an integer >= 1, None when unset.

    Raises:
        ValueError: naming the variable when it is not an integer >= 1.
    """
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r}: must be >= 1")
    return value


def rank_threads(environ: Mapping[str, str], cores: int) -> ThreadChoice:
    """This rank's threads: its launcher's choice from ``environ``, else the same choice made
    here from ``cores``, ``SLURM_CPUS_PER_TASK`` and ``LOCAL_WORLD_SIZE`` (1 when unset).

    Raises:
        ValueError: naming the variable that is not an integer >= 1.
    """
    given = positive_env_int(environ, THREADS_ENV)
    if given is not None:
        return ThreadChoice(given, environ.get(SOURCE_ENV) or THREADS_ENV)
    ranks = positive_env_int(environ, "LOCAL_WORLD_SIZE") or 1
    choice = choose_threads(cores, ranks, positive_env_int(environ, "SLURM_CPUS_PER_TASK"))
    return ThreadChoice(choice.threads, f"{choice.source}, no launcher setting")
