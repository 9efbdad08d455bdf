"""Typed configuration: dataclasses validated by OmegaConf when a YAML file loads.

Unknown keys, wrong types and invalid enum values are errors that name the key
(``data.batch_size``); ``a.b=c`` overrides from the command line go through the same checks.
Runtime objects (process groups, devices) never live here; they are passed to ``build`` calls.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class IdPolicy(enum.Enum):
    """What to do with an id outside its table: ``error`` stops, ``hash`` folds it in range."""

    ERROR = "error"
    HASH = "hash"


class ShardingType(enum.Enum):
    """TorchRec sharding types the planner may choose from (row_wise needs a GPU)."""

    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    TABLE_COLUMN_WISE = "table_column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"
    DATA_PARALLEL = "data_parallel"


class SparseOptimizer(enum.Enum):
    """Fused (in-backward) optimizers for embedding tables."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAGRAD = "adagrad"
    SGD = "sgd"
    ADAM = "adam"


@dataclass
class DataConfig:
    path: str = "data/ml-100k"
    train_split: str = "train"
    batch_size: int = 512
    eval_batch_size: int = 2048
    num_workers: int = 1
    # Rows are shuffled inside windows of this many row groups (resumable without saving rows).
    shuffle_window_row_groups: int = 4
    shuffle: bool = True
    id_policy: IdPolicy = IdPolicy.ERROR
    # Newest history items pooled as an extra feature `hist_recent_item_ids` (0 = not derived).
    recent_history: int = 0
    verify_checksums: bool = True


@dataclass
class ModelConfig:
    embedding_dim: int = 64
    # Per-table embedding dimension overrides, e.g. {item_id: 128}.
    table_dims: dict[str, int] = field(default_factory=dict)
    user_mlp: list[int] = field(default_factory=lambda: [256, 128])
    item_mlp: list[int] = field(default_factory=lambda: [256, 128])
    output_dim: int = 64
    temperature: float = 0.05
    l2_normalize: bool = True


@dataclass
class LossConfig:
    # Net user value = labels . label_weights, clamped at 0; rows with zero value give no signal.
    label_weights: dict[str, float] = field(default_factory=lambda: {"click": 1.0})
    mask_accidental_hits: bool = True
    # Negatives from every rank's batch (differentiable all-gather), not only this rank's.
    global_negatives: bool = False


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    sparse_optimizer: SparseOptimizer = SparseOptimizer.ROWWISE_ADAGRAD
    sparse_lr: float = 0.05
    log_every_steps: int = 20
    progress_bar: bool = True


@dataclass
class ShardingConfig:
    sharding_types: list[ShardingType] = field(
        default_factory=lambda: [ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE]
    )


@dataclass
class EvalConfig:
    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [10, 50, 100])
    exclude_seen: bool = True
    at_end: bool = True
    query_chunk: int = 1024
    corpus_chunk: int = 8192


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "twotower"


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = "twotower"


@dataclass
class ExperimentConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load ``path`` (YAML) over the defaults, then apply ``a.b=c`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, bad enum value or inconsistent values; the message
            names the key and the file.
    """
    source = str(path) if path is not None else "<defaults>"
    try:
        merged = OmegaConf.structured(ExperimentConfig)
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        raise ConfigError(f"{source}: config key '{key}': {message}") from error
    assert isinstance(config, ExperimentConfig)
    validate(config, source)
    return config


def validate(config: ExperimentConfig, source: str = "<config>") -> None:
    """Checks that span several keys or need values (not just types)."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: config key '{key}': {message}")

    if config.data.batch_size < 2:
        fail("data.batch_size", "in-batch negatives need at least 2 rows per batch")
    if config.data.num_workers < 0:
        fail("data.num_workers", "must be >= 0")
    if config.data.recent_history < 0:
        fail("data.recent_history", "must be >= 0")
    if config.data.shuffle_window_row_groups < 1:
        fail("data.shuffle_window_row_groups", "must be >= 1")
    if config.model.temperature <= 0:
        fail("model.temperature", "must be > 0")
    if not config.eval.ks or min(config.eval.ks) < 1:
        fail("eval.ks", "must list positive cutoffs")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        fail("train.max_steps", "must be >= 1 or null")
    if not config.loss.label_weights:
        fail("loss.label_weights", "name at least one label")
    if not config.sharding.sharding_types:
        fail("sharding.sharding_types", "allow at least one sharding type")


def to_yaml(config: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
