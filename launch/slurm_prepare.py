"""``twotower launch slurm-prepare``: ``prepare events`` as SLURM jobs through submitit.

One job runs the global stage with ``--partitions N``; a job array of N runs the partition stage
(element P writes partition P); one job merges. Each waits for the previous ones
(``--dependency=afterok``), so a failed stage stops the rest and leaves ``--out`` as it was. The
jobs read and write the staging folder beside ``--out``: it must be on storage every node sees.

    twotower launch slurm-prepare --partitions 64 --partition cpu --time 120 -- \
        --input /shared/logs --mapping /shared/mapping.yaml --out /shared/data/events
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import submitit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareStage:
    """A picklable job: ``twotower prepare events <arguments> <stage flags>`` in the task."""

    arguments: tuple[str, ...]

    def __call__(self, stage: tuple[str, ...]) -> int:
        from launch.prepare_cli import add_prepare_parsers, prepare

        parser = argparse.ArgumentParser(prog="twotower")
        add_prepare_parsers(parser.add_subparsers(dest="command", required=True))
        # Errors raise, so the job fails and the stages after it never start.
        code = prepare(parser.parse_args(["prepare", "events", *self.arguments, *stage]))
        if code != 0:
            raise RuntimeError(f"prepare events {' '.join(stage)} exited with {code}")
        return code


@dataclass(frozen=True)
class PrepareJobs:
    """Args:
    partitions: N, the partition jobs.
    log_dir: submitit's folder (job scripts, logs, results).
    slurm_partition, account: where the jobs run.
    time_min: minutes per job.
    cpus_per_task: cores per job (default: SLURM's).
    job_name: SLURM job name.
    """

    partitions: int
    log_dir: Path
    slurm_partition: str | None = None
    account: str | None = None
    time_min: int = 60
    cpus_per_task: int | None = None
    job_name: str = "twotower-prepare"

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"--partitions must be >= 1, got {self.partitions}")
        if self.time_min < 1:
            raise ValueError(f"--time must be >= 1 minute, got {self.time_min}")

    def parameters(self) -> dict[str, Any]:
        values = {
            "slurm_job_name": self.job_name,
            "slurm_partition": self.slurm_partition,
            "slurm_account": self.account,
            "slurm_time": self.time_min,
            "slurm_cpus_per_task": self.cpus_per_task,
            "slurm_nodes": 1,
            "slurm_ntasks_per_node": 1,
        }
        return {key: value for key, value in values.items() if value is not None}


def stage_arguments(partitions: int) -> list[tuple[str, ...]]:
    """The stage flags of every job, in submission order: global, N partitions, merge."""
    return [
        ("--stage", "global", "--partitions", str(partitions)),
        *(("--stage", "partition", "--partition", str(p)) for p in range(partitions)),
        ("--stage", "merge"),
    ]


def submit_prepare(jobs: PrepareJobs, arguments: list[str]) -> list[submitit.Job[Any]]:
    """Queue the global job, the partition array and the merge; returns them in that order
    (the last one's ``result()`` waits for the dataset)."""
    import submitit

    stage = PrepareStage(tuple(arguments))
    flags = stage_arguments(jobs.partitions)
    executor = submitit.AutoExecutor(folder=jobs.log_dir.expanduser().absolute(), cluster="slurm")
    executor.update_parameters(**jobs.parameters())
    first = executor.submit(stage, flags[0])
    executor.update_parameters(
        slurm_additional_parameters={"dependency": f"afterok:{first.job_id}"}
    )
    array = executor.map_array(stage, flags[1:-1])
    array_id = array[0].job_id.split("_")[0]
    executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{array_id}"})
    merge = executor.submit(stage, flags[-1])
    logger.info(
        "submitted prepare events: global %s, %d partitions as array %s, merge %s; logs in %s",
        first.job_id,
        jobs.partitions,
        array_id,
        merge.job_id,
        jobs.log_dir,
    )
    return [first, *array, merge]
