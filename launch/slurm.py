"""``twotower launch slurm``: the trainer on a SLURM cluster through submitit, requeued on timeout
and preemption.

Usage::

    # 2 nodes x 8 GPUs: 16 ranks, NCCL, 4 hours per attempt
    twotower launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 240 \\
        configs/synthetic.yaml data.path=/shared/data/synthetic run.dir=/shared/runs/big
    # CPU-only nodes: 4 gloo ranks per node
    twotower launch slurm --nodes 1 --cpu-ranks 4 configs/movielens_100k.yaml
    # print the sbatch script submitit would submit, submit nothing
    twotower launch slurm --nodes 1 --gpus-per-node 8 --dry-run configs/synthetic.yaml

What runs: one SLURM task per GPU, each seeing its node's GPUs and using GPU ``LOCAL_RANK`` (so
no per-task ``--gpu-bind``), or ``--cpu-ranks R`` tasks per node with GPUs hidden so the trainer
picks gloo. Each task reads its place in the job from ``submitit.JobEnvironment``, sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the job's first host) and MASTER_PORT (derived from the
job id, so every task agrees without talking and two jobs sharing a node do not collide), and its
threads per rank (``--threads-per-rank``, else ``--cpus-per-task``, else the cores SLURM gave the
job on the node / tasks per node; see ``trainer.runtime.threads``), then calls
``trainer.train.train`` in process and destroys the process group.

Requeueing: submitit asks SLURM for USR2 90 s before ``--time`` runs out (and SLURM sends it on
preemption); the task's ``TrainTask.checkpoint`` resubmits the same config and the job is requeued
under the same id, up to 3 times for timeouts and without limit for preemption. ``#SBATCH
--requeue`` also lets an administrator's ``scontrol requeue JOBID`` restart it. The trainer itself
picks up the latest complete checkpoint in ``run.dir``; the task carries no state of its own.

Files: ``--log-dir`` (default ``<run.dir>/slurm``) holds the sbatch script, submitit's pickles and
one log pair per task, ``<job id>_<task>_log.out`` / ``_log.err``. The config, the data, ``run.dir``
and ``--log-dir`` must be on a file system every node sees, and this Python environment must exist
at the same path on the nodes (the job runs ``sys.executable``).

Try it without a cluster: ``bash launch/slurm_local_cluster.sh`` (root, Debian) starts a real
one-node cluster on this machine; then ``twotower launch slurm --nodes 1 --cpu-ranks 2 ...``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from submitit.helpers import Checkpointable, DelayedSubmission

from trainer.runtime.threads import (
    OVERRIDE_FLAG,
    ThreadChoice,
    choose_threads,
    positive_env_int,
    thread_environment,
    usable_cores,
)

if TYPE_CHECKING:
    import submitit


logger = logging.getLogger(__name__)

# Rendezvous ports sit below Linux's ephemeral range (32768+), where outgoing connections take theirs.
PORT_BASE = 10_000
PORT_SPAN = 20_000


@dataclass(frozen=True)
class SlurmOptions:
    """What ``twotower launch slurm`` asks SLURM for; invalid values raise naming the flag.

    Args:
        nodes: nodes in the allocation (``--nodes``).
        gpus_per_node: GPUs per node, one rank each, NCCL (``--gpus-per-node``); 0 on CPU nodes.
        cpu_ranks: ranks per node on CPU nodes, gloo (``--cpu-ranks``); None on GPU nodes.
        time_min: wall-clock limit of one attempt in minutes (``--time``).
        partition: SLURM partition (``--partition``); None for the cluster's default.
        account: SLURM account (``--account``); None for the user's default.
        job_name: SLURM job name (``--job-name``).
        cpus_per_task: cores per rank, for data-loader workers (``--cpus-per-task``); None for
            SLURM's default of 1.
        threads_per_rank: intra-op and inter-op threads of each rank (``--threads-per-rank``);
            None to decide on the node (:func:`task_threads`).
        log_dir: submitit's folder (``--log-dir``); None for ``<run.dir>/slurm``.
    """

    nodes: int = 1
    gpus_per_node: int = 0
    cpu_ranks: int | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    job_name: str = "twotower"
    cpus_per_task: int | None = None
    threads_per_rank: int | None = None
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.cpu_ranks is not None and self.gpus_per_node:
            raise ValueError(
                "--cpu-ranks and --gpus-per-node exclude each other: GPU nodes run one rank per GPU"
            )
        if self.cpu_ranks is None and not self.gpus_per_node:
            raise ValueError("one of --gpus-per-node G (GPU nodes) or --cpu-ranks R is required")
        if self.cpu_ranks is not None and self.cpu_ranks < 1:
            raise ValueError(f"--cpu-ranks must be >= 1, got {self.cpu_ranks}")
        if self.time_min < 1:
            raise ValueError(f"--time must be >= 1 minute, got {self.time_min}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.threads_per_rank is not None and self.threads_per_rank < 1:
            raise ValueError(f"{OVERRIDE_FLAG} must be >= 1, got {self.threads_per_rank}")
        if not self.job_name.strip():
            raise ValueError("--job-name must not be empty")

    @property
    def on_cpu(self) -> bool:
        return self.cpu_ranks is not None

    @property
    def tasks_per_node(self) -> int:
        return self.cpu_ranks if self.cpu_ranks is not None else self.gpus_per_node


def master_port(job_id: str) -> int:
    """The rendezvous port of a job, the same in every task: a pure function of the job id.

    Args:
        job_id: SLURM job id, ``"1234"``, or ``"1234_5"`` for element 5 of an array job.
    """
    main, _, index = job_id.partition("_")
    try:
        number = int(main) + int(index or 0)
    except ValueError:
        raise ValueError(
            f"SLURM job id {job_id!r} is not '<number>' or '<number>_<index>'"
        ) from None
    return PORT_BASE + number % PORT_SPAN


def rank_environment(
    job_id: str, global_rank: int, local_rank: int, num_tasks: int, hostnames: Sequence[str]
) -> dict[str, str]:
    """The torch.distributed ``env://`` variables of one task (what torchrun would set).

    Args:
        job_id: SLURM job id (sets MASTER_PORT).
        global_rank: this task's rank in the job, ``SLURM_PROCID``.
        local_rank: this task's rank on its node, ``SLURM_LOCALID`` (its GPU index).
        num_tasks: tasks in the job, the world size.
        hostnames: the job's hosts in SLURM order; the first one hosts the rendezvous.
    """
    if not hostnames:
        raise ValueError("the SLURM job has no hosts (SLURM_JOB_NODELIST is empty)")
    return {
        "RANK": str(global_rank),
        "WORLD_SIZE": str(num_tasks),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": str(master_port(job_id)),
    }


def task_threads(
    environ: Mapping[str, str], ranks_per_node: int, override: int | None, cores: int
) -> ThreadChoice:
    """Threads of each task on its node: ``override`` (``--threads-per-rank``), else
    ``SLURM_CPUS_PER_TASK``, else the CPUs SLURM gave the job on this node
    (``SLURM_CPUS_ON_NODE``, else ``cores``) / ``ranks_per_node``, at least 1.

    Args:
        environ: the task's environment.
        ranks_per_node: tasks of the job on this node.
        override: ``--threads-per-rank``; None to decide from the allocation.
        cores: cores this task may run on, where SLURM does not say.

    Raises:
        ValueError: naming the variable or flag that is not an integer >= 1.
    """
    node_cores = positive_env_int(environ, "SLURM_CPUS_ON_NODE") or cores
    cpus_per_task = positive_env_int(environ, "SLURM_CPUS_PER_TASK")
    return choose_threads(node_cores, ranks_per_node, cpus_per_task, override)


def _exit_without_teardown() -> None:
    """Leave a task that succeeded without interpreter teardown.

    Seen on a requeued job: a C++ thread of the distributed runtime still joinable at
    finalization aborted rank 0 ("terminate called without an active exception", exit 134)
    after the task had finished and its result was written, and SLURM recorded the whole job
    FAILED. Only registered after success, so failures keep their exit code and traceback.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ``--job`` -> (module, function) every task runs; each resumes from its run directory.
JOBS = {
    "train": ("trainer.train", "train"),
    "train-ranker": ("trainer.ranker_train", "train_ranker"),
    "align": ("trainer.align", "align"),
}


@dataclass(frozen=True)
class TrainTask(Checkpointable):
    """What every SLURM task runs: one rank of ``job`` on ``config`` with ``overrides``.

    Args:
        config: absolute path of the experiment YAML.
        overrides: ``key=value`` config overrides.
        cpu_only: hide GPUs so the job runs on CPU with gloo (``--cpu-ranks``).
        job: a key of :data:`JOBS` (retrieval training, ranker training, alignment).
        threads_per_rank: ``--threads-per-rank``; None to decide on the node.
    """

    config: str
    overrides: tuple[str, ...]
    cpu_only: bool
    job: str = "train"
    threads_per_rank: int | None = None

    def __call__(self) -> Any:
        import submitit

        if self.cpu_only:
            # Before torch initializes CUDA: the trainer picks NCCL whenever it sees a GPU.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        job = submitit.JobEnvironment()
        os.environ.update(
            rank_environment(
                job.job_id, job.global_rank, job.local_rank, job.num_tasks, job.hostnames
            )
        )
        # Before the job's imports: other libraries' OpenMP runtimes read it when they load.
        ranks_per_node = max(1, job.num_tasks // job.num_nodes)
        threads = task_threads(os.environ, ranks_per_node, self.threads_per_rank, usable_cores())
        os.environ.update(thread_environment(threads))
        import importlib

        from config import load_config
        from trainer.runtime.distributed import shutdown
        from trainer.runtime.logs import configure_logging

        module, function = JOBS[self.job]
        run = getattr(importlib.import_module(module), function)

        configure_logging()
        logger.info(
            "job %s task %d of %d on %s (local rank %d), rendezvous %s:%s, restart %s",
            job.job_id,
            job.global_rank,
            job.num_tasks,
            job.hostname,
            job.local_rank,
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        )
        try:
            result = run(load_config(self.config, list(self.overrides)))
        finally:
            shutdown()
        # Runs after submitit has written this task's result and logged success.
        atexit.register(_exit_without_teardown)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # The trainer's checkpoints in run.dir hold all the state; the requeued job runs the same
        # config and the trainer resumes from the latest complete one.
        return DelayedSubmission(self)


def make_task(
    options: SlurmOptions, config: str, overrides: list[str], job: str = "train"
) -> TrainTask:
    """The task for ``config``; loads it once here so a bad key fails before anything is queued.

    Raises:
        ConfigError: unknown key, wrong type or inconsistent values (names the key and the file).
        ValueError: ``job`` is not one of :data:`JOBS`.
    """
    from config import load_config

    if job not in JOBS:
        raise ValueError(f"--job {job!r}: choose one of {sorted(JOBS)}")
    load_config(config, overrides)
    absolute = str(Path(config).absolute())
    return TrainTask(
        absolute,
        tuple(overrides),
        cpu_only=options.on_cpu,
        job=job,
        threads_per_rank=options.threads_per_rank,
    )


def job_folder(options: SlurmOptions, task: TrainTask) -> Path:
    """Absolute submitit folder: ``--log-dir``, else ``<run.dir>/slurm``."""
    if options.log_dir is not None:
        return options.log_dir.expanduser().absolute()
    from config import load_config

    run_dir = Path(load_config(task.config, list(task.overrides)).run.dir)
    return (run_dir / "slurm").expanduser().absolute()


def sbatch_parameters(options: SlurmOptions) -> dict[str, Any]:
    """``options`` as submitit SlurmExecutor parameters (its own names, e.g. ``ntasks_per_node``)."""
    parameters: dict[str, Any] = {
        "job_name": options.job_name,
        "nodes": options.nodes,
        "ntasks_per_node": options.tasks_per_node,
        "gpus_per_node": options.gpus_per_node or None,
        "cpus_per_task": options.cpus_per_task,
        "time": options.time_min,
        "partition": options.partition,
        "account": options.account,
        # Clusters default to JobRequeue=0; preemption and `scontrol requeue` need it on.
        "additional_parameters": {"requeue": True},
    }
    return {key: value for key, value in parameters.items() if value is not None}


def sbatch_script(options: SlurmOptions, task: TrainTask) -> str:
    """The sbatch script that ``submit`` hands to SLURM, built without a cluster.

    submitit 1.5.4 has no public way to render it, and its SlurmExecutor refuses to exist where
    ``srun`` is missing, so this calls the function the executor itself renders with, and builds the
    command the way ``SlurmExecutor._submitit_command_str`` does.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(options, task)
    command = (
        f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    )
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(options))


def submit(options: SlurmOptions, task: TrainTask) -> submitit.Job[Any]:
    """Queues ``task`` on ``options.nodes * options.tasks_per_node`` SLURM tasks; the job's
    ``results()`` waits for them and returns every rank's result (the job's result type)."""
    import submitit

    executor = submitit.AutoExecutor(folder=job_folder(options, task), cluster="slurm")
    executor.update_parameters(
        **{f"slurm_{key}": value for key, value in sbatch_parameters(options).items()}
    )
    job = executor.submit(task)
    logger.info(
        "submitted SLURM job %s: %d node(s) x %d rank(s) (%s); logs in %s",
        job.job_id,
        options.nodes,
        options.tasks_per_node,
        "gloo" if options.on_cpu else "NCCL",
        job.paths.folder,
    )
    return job
