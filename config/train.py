"""The ``train``, ``checkpoint``, ``sharding``, ``logging`` and ``run`` sections: how the
loop runs, saves, shards and reports."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from config.errors import Fail


class ShardingType(enum.Enum):
    """TorchRec sharding types the planner may choose from (row_wise needs a GPU)."""

    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    TABLE_COLUMN_WISE = "table_column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"
    DATA_PARALLEL = "data_parallel"


class NonFinitePolicy(enum.Enum):
    """What a step with a NaN or infinite loss does (decided collectively, before backward)."""

    SKIP = "skip"  # no update on any rank; counted, the batch saved under <run>/bad_batches
    HALT = "halt"  # save the batch, then stop with an error


class SparseOptimizer(enum.Enum):
    """Fused (in-backward) optimizers for embedding tables."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAGRAD = "adagrad"
    SGD = "sgd"
    ADAM = "adam"


class LRDecay(enum.Enum):
    """The dense learning rate after warm-up: held, or decayed to ``min_ratio`` of itself."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclass
class LRScheduleConfig:
    """The dense optimizer's learning rate per step (``trainer/runtime/lr_schedule.py``): linear warm-up
    from 0 over ``warmup_steps``, then ``decay`` to ``min_ratio`` x the base rate at
    ``decay_steps`` (null: ``train.max_steps``) and held there. A pure function of the global
    step, so a resumed run continues it exactly. The fused table optimizers keep their rate."""

    warmup_steps: int = 0
    decay: LRDecay = LRDecay.CONSTANT
    decay_steps: int | None = None
    min_ratio: float = 0.0


@dataclass
class TrainConfig:
    """How a job's loop trains (``trainer/runtime/loop.py``): the retrieval job's ``train``
    section; the ranker and alignment jobs have their own (``ranker.train``,
    ``alignment.train``) of the same shape. ``epochs`` null: as many passes as
    ``max_steps`` needs."""

    epochs: int | None = 1
    max_steps: int | None = None
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    sparse_optimizer: SparseOptimizer = SparseOptimizer.ROWWISE_ADAGRAD
    sparse_lr: float = 0.05
    log_every_steps: int = 20
    progress_bar: bool = True
    non_finite_loss: NonFinitePolicy = NonFinitePolicy.SKIP
    # Halt once this many steps were skipped for a non-finite loss (a broken run, not a bad row).
    max_skipped_steps: int = 100
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run.dir>/checkpoints/step-N`` (see ``trainer.runtime.checkpoint``).

    ``every_n_steps`` null saves only at the end (and on a signal). ``resume`` picks up the
    latest complete checkpoint of ``run.dir`` automatically. ``signals`` are caught: every rank
    finishes its step, the job saves and stops (exit 128 + signal number).
    """

    every_n_steps: int | None = None
    keep_last: int = 2
    resume: bool = True
    # Start from this checkpoint folder (or a run directory's latest) when run.dir has none:
    # warm starts, or continuing a run on another world size.
    resume_from: str | None = None
    async_save: bool = False
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class ShardingConfig:
    """What the TorchRec planner may choose and the cluster it plans for
    (``trainer/runtime/sharding.py``).

    The cluster keys are optional; null takes the launcher's environment where it says
    (``local_world_size``: torchrun's ``LOCAL_WORLD_SIZE``, else SLURM's
    ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``), else TorchRec's default (one host
    holding every rank; 32 GiB HBM per device, 128 GiB DDR per rank, 600 GiB/s within a host,
    12.5 GiB/s between hosts). A set key wins over the environment.
    """

    sharding_types: list[ShardingType] = field(
        default_factory=lambda: [ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE]
    )
    # Ranks per host; must divide the world size. Table-row-wise shards stay within one host.
    local_world_size: int | None = None
    hbm_cap_gib: float | None = None  # accelerator memory per device (GiB, 1024**3 bytes)
    ddr_cap_gib: float | None = None  # host memory per rank (GiB)
    intra_host_bw_gib_per_s: float | None = None  # between devices of one host (NVLink)
    inter_host_bw_gib_per_s: float | None = None  # between hosts, per rank (InfiniBand, RoCE)


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "twotower"


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = "twotower"


def validate_train(train: TrainConfig, fail: Fail, section: str = "train") -> None:
    """Checks a loop section: ``train`` (retrieval), ``ranker.train`` or ``alignment.train``."""
    if train.epochs is None and train.max_steps is None:
        fail(f"{section}.epochs", "null (as many epochs as needed) needs max_steps")
    if train.epochs is not None and train.epochs < 1:
        fail(f"{section}.epochs", "must be >= 1 or null (until max_steps)")
    if train.max_steps is not None and train.max_steps < 1:
        fail(f"{section}.max_steps", "must be >= 1 or null")
    if train.dense_lr <= 0 or train.sparse_lr < 0:
        fail(f"{section}.dense_lr", "dense_lr must be > 0 and sparse_lr >= 0")
    if train.max_skipped_steps < 0:
        fail(f"{section}.max_skipped_steps", "must be >= 0")
    if train.log_every_steps < 1:
        fail(f"{section}.log_every_steps", "must be >= 1")
    schedule = train.lr_schedule
    if schedule.warmup_steps < 0:
        fail(f"{section}.lr_schedule.warmup_steps", "must be >= 0")
    if not 0 <= schedule.min_ratio <= 1:
        fail(f"{section}.lr_schedule.min_ratio", "must be in [0, 1]")
    if schedule.decay is not LRDecay.CONSTANT:
        horizon = schedule.decay_steps if schedule.decay_steps is not None else train.max_steps
        if horizon is None:
            fail(
                f"{section}.lr_schedule.decay_steps",
                f"decay={schedule.decay.value} needs a horizon: set decay_steps or "
                f"{section}.max_steps",
            )
        elif horizon <= schedule.warmup_steps:
            fail(
                f"{section}.lr_schedule.decay_steps",
                f"the decay horizon ({horizon}) must exceed warmup_steps ({schedule.warmup_steps})",
            )


def validate_checkpoint(checkpoint: CheckpointConfig, fail: Fail) -> None:
    if checkpoint.every_n_steps is not None and checkpoint.every_n_steps < 1:
        fail("checkpoint.every_n_steps", "must be >= 1 or null (save only at the end)")
    if checkpoint.keep_last < 1:
        fail("checkpoint.keep_last", "must be >= 1")
    known = {"SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"}
    unknown = sorted(set(checkpoint.signals) - known)
    if unknown:
        fail("checkpoint.signals", f"unknown signals {unknown} (choose from {sorted(known)})")


def validate_sharding(sharding: ShardingConfig, fail: Fail) -> None:
    """Checks what needs no cluster; ``local_world_size`` dividing the world size is checked
    when the planner's topology is built (``trainer.runtime.sharding.cluster_topology``)."""
    if not sharding.sharding_types:
        fail("sharding.sharding_types", "allow at least one sharding type")
    if sharding.local_world_size is not None and sharding.local_world_size < 1:
        fail("sharding.local_world_size", "must be >= 1 or null (from the launcher)")
    positive = {
        "hbm_cap_gib": sharding.hbm_cap_gib,
        "ddr_cap_gib": sharding.ddr_cap_gib,
        "intra_host_bw_gib_per_s": sharding.intra_host_bw_gib_per_s,
        "inter_host_bw_gib_per_s": sharding.inter_host_bw_gib_per_s,
    }
    for key, value in positive.items():
        if value is not None and not 0 < value < math.inf:
            fail(f"sharding.{key}", f"must be > 0 and finite, or null, got {value}")
