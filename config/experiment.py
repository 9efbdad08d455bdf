"""The whole experiment config and the checks that span several sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from config.alignment import AlignmentConfig, validate_alignment
from config.data import DataConfig, validate_data
from config.distillation import DistillationConfig, validate_distillation
from config.errors import ConfigError, Fail
from config.evaluation import EvalConfig, validate_eval
from config.features import FeaturesConfig, validate_features
from config.loss import LossConfig, LossFamily, validate_loss
from config.model import Encoder, ModelConfig, validate_model
from config.negatives import NegativesConfig, validate_negatives
from config.ranker import RankerConfig, validate_ranker
from config.sequence import validate_sequence
from config.train import (
    CheckpointConfig,
    LoggingConfig,
    RunConfig,
    ShardingConfig,
    TrainConfig,
    validate_checkpoint,
    validate_sharding,
    validate_train,
)


@dataclass
class ExperimentConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


def validate(config: ExperimentConfig, source: str = "<config>") -> None:
    """Every section's own checks, then those that span sections; the first problem raises a
    ConfigError naming ``source`` and the key."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: config key '{key}': {message}")

    validate_data(config.data, fail)
    validate_model(config.model, fail)
    validate_eval(config.eval, fail)
    validate_train(config.train, fail)
    validate_loss(config.loss, fail)
    validate_sharding(config.sharding, fail)
    validate_checkpoint(config.checkpoint, fail)
    _validate_history(config, fail)
    validate_negatives(config.negatives, fail)
    _validate_logged_bce(config, fail)
    validate_ranker(config.ranker, fail)
    validate_alignment(config.alignment, fail)
    _validate_light_head(config, fail)
    validate_distillation(config.distillation, fail)
    validate_features(config.features, fail)
    validate_sequence(config, fail)


def _validate_history(config: ExperimentConfig, fail: Fail) -> None:
    history = config.model.history
    if not history.enabled:
        return
    if history.max_length < 1 or history.num_layers < 1 or history.num_heads < 1:
        fail("model.history.max_length", "max_length, num_layers and num_heads must be >= 1")
    if history.recency_buckets < 0:
        fail("model.history.recency_buckets", "must be >= 0 (0: no recency embedding)")
    if not 0 <= history.dropout < 1:
        fail("model.history.dropout", "must be in [0, 1)")
    dim = config.model.table_dims.get("item_id", config.model.embedding_dim)
    if history.encoder is Encoder.SELF_ATTENTION and dim % history.num_heads:
        fail(
            "model.history.num_heads",
            f"must divide the item embedding dimension {dim} (model.embedding_dim / "
            "model.table_dims.item_id)",
        )
    if config.data.recent_history > 0:
        fail(
            "data.recent_history",
            "the history encoder sees the newest events itself; set data.recent_history=0 "
            "with model.history.enabled=true",
        )


def _validate_logged_bce(config: ExperimentConfig, fail: Fail) -> None:
    """``logged_bce`` scores no candidates: a negative source would be built and never used."""
    if config.loss.family is not LossFamily.LOGGED_BCE:
        return
    negatives = config.negatives
    sources = {
        "negatives.log_q.enabled": negatives.log_q.enabled,
        "negatives.mixed.num_samples": negatives.mixed.num_samples > 0,
        "negatives.memory.size": negatives.memory.size > 0,
        "negatives.impressions.per_row": negatives.impressions.per_row > 0,
        "negatives.mined.per_row": negatives.mined.per_row > 0,
    }
    for key, enabled in sources.items():
        if enabled:
            fail(
                key,
                "loss.family=logged_bce learns from each row's logged label and scores no "
                "candidates; turn the negative source off or pick a candidate family",
            )


def _validate_light_head(config: ExperimentConfig, fail: Fail) -> None:
    head = config.model.light_head
    if not head.enabled:
        return
    if head.num_embeddings < 1:
        fail("model.light_head.num_embeddings", "must be >= 1")
    if any(width < 1 for width in head.hidden):
        fail("model.light_head.hidden", f"hidden widths must be >= 1, got {head.hidden}")
    if head.loss_weight <= 0:
        fail("model.light_head.loss_weight", "must be > 0 (disable the head with enabled=false)")
    if not 0 <= head.negatives_per_row < config.data.batch_size:
        fail(
            "model.light_head.negatives_per_row",
            f"must be in [0, data.batch_size={config.data.batch_size})",
        )
    if head.num_items < 1:
        fail("model.light_head.num_items", "must be >= 1")
    if head.num_knn_items < head.num_items:
        fail(
            "model.light_head.num_knn_items",
            f"must be >= model.light_head.num_items ({head.num_items}): the head reranks the "
            "retrieved items",
        )
