"""Threads per rank: the choice (cores, ranks, --cpus-per-task, --threads-per-rank), what each
launcher hands its ranks, and a rank applying it at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from launch.local import launch_local, local_threads
from launch.slurm import SlurmOptions, make_task, task_threads
from trainer.runtime.distributed import apply_threads
from trainer.runtime.threads import (
    SOURCE_ENV,
    THREADS_ENV,
    ThreadChoice,
    choose_threads,
    rank_threads,
    thread_environment,
    usable_cores,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("cores", "ranks", "cpus_per_task", "override", "expected"),
    [
        (16, 2, None, None, ThreadChoice(8, "16 cores / 2 ranks per node")),
        (16, 3, None, None, ThreadChoice(5, "16 cores / 3 ranks per node")),
        (2, 4, None, None, ThreadChoice(1, "2 cores / 4 ranks per node")),  # at least 1
        (8, 1, None, None, ThreadChoice(8, "8 cores / 1 rank per node")),
        (64, 8, 6, None, ThreadChoice(6, "--cpus-per-task=6")),
        (64, 8, 6, 3, ThreadChoice(3, "--threads-per-rank")),
        (2, 2, None, 12, ThreadChoice(12, "--threads-per-rank")),  # the user's word stands
    ],
)
def test_choice_from_cores_ranks_cpus_per_task_and_override(
    cores: int, ranks: int, cpus_per_task: int | None, override: int | None, expected: ThreadChoice
) -> None:
    assert choose_threads(cores, ranks, cpus_per_task, override) == expected


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ((4, 2, None, 0), "--threads-per-rank"),
        ((4, 2, 0, None), "--cpus-per-task"),
        ((4, 0, None, None), "ranks per node"),
        ((0, 1, None, None), "cores"),
    ],
)
def test_bad_counts_are_named(arguments: tuple, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        choose_threads(*arguments)


def test_rank_takes_its_launchers_choice_else_makes_it() -> None:
    given = {THREADS_ENV: "3", SOURCE_ENV: "--threads-per-rank", "LOCAL_WORLD_SIZE": "2"}
    assert rank_threads(given, cores=16) == ThreadChoice(3, "--threads-per-rank")
    # Plain torchrun: its LOCAL_WORLD_SIZE ranks share the cores (its OMP_NUM_THREADS=1 aside).
    torchrun = {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}
    assert rank_threads(torchrun, cores=16).threads == 4
    assert rank_threads({}, cores=16).source == "16 cores / 1 rank per node, no launcher setting"
    assert rank_threads({"SLURM_CPUS_PER_TASK": "5"}, cores=16).threads == 5
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match=THREADS_ENV):
            rank_threads({THREADS_ENV: bad}, cores=16)


def test_slurm_task_reads_its_allocation() -> None:
    on_node = {"SLURM_CPUS_ON_NODE": "32"}
    assert task_threads(on_node, 4, None, cores=128) == ThreadChoice(
        8, "32 cores / 4 ranks per node"
    )
    # Without SLURM's count, the cores the task may run on (a cluster that binds nothing).
    assert task_threads({}, 2, None, cores=64).threads == 32
    assert task_threads({**on_node, "SLURM_CPUS_PER_TASK": "6"}, 4, None, 128).threads == 6
    assert task_threads({**on_node, "SLURM_CPUS_PER_TASK": "6"}, 4, 2, 128).threads == 2
    with pytest.raises(ValueError, match="SLURM_CPUS_PER_TASK"):
        task_threads({"SLURM_CPUS_PER_TASK": "x"}, 4, None, 128)


def test_environment_a_launcher_sets() -> None:
    assert thread_environment(ThreadChoice(4, "--threads-per-rank")) == {
        "OMP_NUM_THREADS": "4",
        THREADS_ENV: "4",
        SOURCE_ENV: "--threads-per-rank",
    }


def test_local_launch_hands_its_ranks_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, str]] = []
    monkeypatch.setattr("launch.local.subprocess.call", lambda command, env: calls.append(env) or 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a stale setting is replaced
    assert launch_local(2, "c.yaml", []) == 0
    expected = max(1, usable_cores() // 2)
    assert calls[-1]["OMP_NUM_THREADS"] == calls[-1][THREADS_ENV] == str(expected)
    assert calls[-1][SOURCE_ENV] == f"{usable_cores()} cores / 2 ranks per node"
    config = str(REPO / "configs" / "movielens_100k.yaml")
    assert main(["launch", "local", "--nproc", "2", "--threads-per-rank", "3", config]) == 0
    assert calls[-1][THREADS_ENV] == "3" and calls[-1][SOURCE_ENV] == "--threads-per-rank"
    with pytest.raises(ValueError, match="--nproc"):
        local_threads(0)


def test_slurm_flag_travels_with_the_task(tmp_path: Path, caplog) -> None:
    config = str(REPO / "configs" / "movielens_100k.yaml")
    options = SlurmOptions(cpu_ranks=2, threads_per_rank=3)
    assert make_task(options, config, [f"run.dir={tmp_path}"]).threads_per_rank == 3
    arguments = ["launch", "slurm", "--cpu-ranks", "2", "--threads-per-rank", "0", "--dry-run"]
    assert main([*arguments, config]) == 2
    assert "--threads-per-rank" in caplog.text


def test_bad_setting_fails_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "-2")
    with pytest.raises(ValueError, match=THREADS_ENV):
        apply_threads(0)  # raises before it touches this process's threads


RANK_START = """
import torch
from trainer.runtime.distributed import init_distributed, shutdown
from trainer.runtime.logs import configure_logging

configure_logging()
init_distributed()
print(torch.get_num_threads(), torch.get_num_interop_threads())
shutdown()
"""


def test_rank_applies_and_logs_its_threads_at_start() -> None:
    """A bare process with a launcher's setting: both thread pools take it, rank 0 says so."""
    launcher_names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    env = {k: v for k, v in os.environ.items() if k not in launcher_names}
    env.update(thread_environment(ThreadChoice(3, "--threads-per-rank")))
    result = subprocess.run(
        [sys.executable, "-c", RANK_START],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["3", "3"]
    line = "threads per rank: 3 intra-op, 3 inter-op (--threads-per-rank)"
    assert result.stderr.count(line) == 1, result.stderr[-3000:]
