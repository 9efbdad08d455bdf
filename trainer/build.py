"""Builds the runtime pieces of a run from the config and the dataset manifest."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from config import ConfigError, ExperimentConfig, TrainConfig
from data_pipeline.batch import BatchBuilder
from data_pipeline.derived import history_feature_tables, with_derived_features
from data_pipeline.feature_encoding import FeatureEncoding
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.loader import LoaderSpec
from data_pipeline.manifest import Manifest
from data_pipeline.schema import EventSchema
from models.sparse_part import build_sparse_part
from models.two_tower import TwoTowerModel
from trainer.features import ResolvedFeatures, resolve_features
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.logs import quiet_libraries
from trainer.runtime.sharding import attach_sparse_optimizer, shard_model


def history_recency(config: ExperimentConfig) -> int:
    """-1 without the history encoder (no per-event features), else its recency buckets."""
    history = config.model.history
    return history.recency_buckets if history.enabled else -1


def _derived_schema(resolved: ResolvedFeatures, config: ExperimentConfig) -> EventSchema:
    return with_derived_features(
        resolved.schema, config.data.recent_history, history_recency(config)
    )


def _resolved(
    manifest: Manifest, config: ExperimentConfig, features: ResolvedFeatures | None
) -> ResolvedFeatures:
    """The job's resolved features (a job resolves once and passes them to every builder);
    resolved here for a caller that has none."""
    return features if features is not None else resolve_features(manifest, config)


def model_schema(
    manifest: Manifest, config: ExperimentConfig, features: ResolvedFeatures | None = None
) -> EventSchema:
    """The model-facing schema: the stored features the config selects (``features``) plus the
    derived ones it switches on."""
    return _derived_schema(_resolved(manifest, config, features), config)


def model_tables(
    manifest: Manifest, config: ExperimentConfig, features: ResolvedFeatures | None = None
) -> dict[str, int]:
    """Table sizes: the manifest's, features' own tables, the history encoder's tables."""
    tables = _resolved(manifest, config, features).tables
    recency = history_recency(config)
    if recency < 0:
        return tables
    return {**tables, **history_feature_tables(manifest.schema, recency)}


def batch_builder(
    manifest: Manifest, config: ExperimentConfig, features: ResolvedFeatures | None = None
) -> BatchBuilder:
    """Arrow -> Batch for the model's features (stored plus derived)."""
    resolved = _resolved(manifest, config, features)
    return BatchBuilder(
        _derived_schema(resolved, config),
        config.data.recent_history,
        recency_buckets=max(history_recency(config), 0),
        encoding=resolved.encoding,
    )


def item_store(
    manifest: Manifest, config: ExperimentConfig, features: ResolvedFeatures | None = None
) -> ItemFeatureStore:
    """The item corpus by id, encoded like the training batches' item side."""
    resolved = _resolved(manifest, config, features)
    return ItemFeatureStore.load(
        config.data.path, manifest, _derived_schema(resolved, config), resolved.encoding
    )


def build_unsharded_model(
    manifest: Manifest,
    config: ExperimentConfig,
    device: torch.device | None = None,
    features: ResolvedFeatures | None = None,
) -> TwoTowerModel:
    resolved = _resolved(manifest, config, features)
    try:
        schema = _derived_schema(resolved, config)
        tables = model_tables(manifest, config, resolved)
        sparse = build_sparse_part(schema, tables, config.model, resolved.layout, device)
        return TwoTowerModel(schema, sparse, config.model, layout=resolved.layout)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from error


def build_sharded_model(
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    features: ResolvedFeatures | None = None,
    train: TrainConfig | None = None,
) -> DistributedModelParallel:
    """Tables created on ``meta`` and materialized shard by shard by DMP; dense layers are
    data-parallel. The fused sparse optimizer of the job's loop section ``train`` (default
    ``config.train``) is attached before sharding."""
    model = build_unsharded_model(manifest, config, torch.device("meta"), features)
    section = train if train is not None else config.train
    attach_sparse_optimizer(model, section.sparse_optimizer, section.sparse_lr)
    return shard_model(model, config.sharding, env.device, env.world_size)


def build_dense_optimizer(
    model: nn.Module, config: ExperimentConfig, train: TrainConfig | None = None
) -> KeyedOptimizerWrapper:
    """AdamW over every parameter that has no fused in-backward optimizer, at the rates of the
    job's loop section ``train`` (default: the retrieval job's ``config.train``)."""
    section = train if train is not None else config.train
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    return KeyedOptimizerWrapper(
        dense,
        lambda params: torch.optim.AdamW(
            params, lr=section.dense_lr, weight_decay=section.dense_weight_decay
        ),
    )


def with_teacher_user_features(resolved: ResolvedFeatures, manifest: Manifest) -> ResolvedFeatures:
    """The student's features plus the stored user features the ranker reads (every user
    feature of the manifest, as the ranker trains on them): a job whose batches a frozen ranker
    also scores (the listwise distillation teacher, alignment's reward model) asks its loader
    for the union of what the student and the ranker need. The student's model selects its own
    keys."""
    have = {feature.name for feature in resolved.schema.features}
    extra = [feature for feature in manifest.schema.user_features() if feature.name not in have]
    if not extra:
        return resolved
    features = (*resolved.schema.features, *extra)
    tables = {**{f.table: manifest.tables[f.table] for f in extra}, **resolved.tables}
    encoding = FeatureEncoding.from_manifest(
        manifest.counters, tables, features, resolved.encoding.mean_weighted
    )
    schema = replace(resolved.schema, features=features)
    return replace(resolved, schema=schema, tables=tables, encoding=encoding)


def label_weights(manifest: Manifest, config: ExperimentConfig) -> torch.Tensor:
    """[T] weights in the manifest's label order; unknown label names are config errors."""
    labels = list(manifest.schema.labels)
    unknown = sorted(set(config.loss.label_weights) - set(labels))
    if unknown:
        raise ConfigError(
            f"config key 'loss.label_weights': labels {unknown} not in the data (have {labels})"
        )
    return torch.tensor([config.loss.label_weights.get(x, 0.0) for x in labels])


def loader_spec(
    config: ExperimentConfig,
    split: str,
    train: bool,
    manifest: Manifest | None = None,
    features: ResolvedFeatures | None = None,
) -> LoaderSpec:
    """The loader of ``split``; with ``manifest``, it reads only ``features`` (default: the
    configured ones; a job whose ranker scores the batches passes
    :func:`with_teacher_user_features`)."""
    data = config.data
    resolved = _resolved(manifest, config, features) if manifest is not None else None
    # Without the manifest the loader fits the encoding to the manifest's own features.
    encoding = resolved.encoding if resolved else None
    if resolved and encoding and train and resolved.dropout:
        encoding = replace(encoding, dropout=resolved.dropout, dropout_seed=config.seed)
    return LoaderSpec(
        root=data.path,
        split=split,
        batch_size=data.batch_size if train else data.eval_batch_size,
        num_workers=data.num_workers,
        shuffle=data.shuffle and train,
        window=data.shuffle_window_row_groups,
        id_policy=data.id_policy.value,
        seed=config.seed,
        recent_history=data.recent_history,
        impression_negatives=config.negatives.impressions.per_row if train else 0,
        recency_buckets=history_recency(config),
        schema=resolved.schema if resolved else None,
        encoding=encoding,
        id_policies=resolved.id_policies if resolved else {},
        tables=resolved.tables if resolved else None,
        worker_setup=quiet_libraries,
        sequence_length=(
            sequence_length(config, manifest, resolved.schema if resolved else None) if train else 0
        ),
    )


def sequence_length(
    config: ExperimentConfig, manifest: Manifest | None, schema: EventSchema | None = None
) -> int:
    """Positions per training window in sequence mode (``model.history.packed``), else 0.

    Raises:
        ConfigError: the dataset stores shorter histories than ``model.history.max_length``
            (the windows could never be as long as configured), or ``schema`` (the features
            read) has user features that change with each event, which one window row cannot
            give every position.
    """
    history = config.model.history
    if not (history.enabled and history.packed):
        return 0
    per_event = [f.name for f in (schema.user_features() if schema else ()) if f.per_event]
    if per_event:
        raise ConfigError(
            f"config key 'features.groups' = {config.features.groups}: user features "
            f"{per_event} change with each event, and model.history.packed=true gives every "
            "position of a window the window row's user features; drop their groups "
            "(context, search)"
        )
    if manifest is not None and manifest.history_length < history.max_length:
        raise ConfigError(
            f"config key 'model.history.max_length' = {history.max_length}: the dataset at "
            f"data.path={config.data.path} stores histories of at most "
            f"{manifest.history_length} events; prepare it with --history-length "
            f"{history.max_length} or lower model.history.max_length"
        )
    return history.max_length
