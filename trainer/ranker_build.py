"""Builds the ranker of a run (sharded or not), its training examples, and loads a trained one.

``load_ranker`` is the entry point for the parts that use a trained ranker (teacher, reward
model, funnel evaluation)::

    ranker = load_ranker("runs/ranker_ml100k", manifest)          # one full replica, no collectives
    logits = ranker.score(batch.user_features, batch.item_features)   # [B, T]
    values = ranker.net_user_value(batch.user_features, batch.item_features)  # [B]
    logits = ranker.score_items(user_features, store.lookup(store.corpus_ids()))  # [U, N, T]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel

from config import ConfigError, ExperimentConfig, load_config
from data_pipeline.batch import Batch, BatchBuilder
from data_pipeline.derived import with_derived_features
from data_pipeline.feature_encoding import FeatureEncoding
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.loader import LoaderSpec
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from data_pipeline.schema import EventSchema
from models.ranker import Ranker
from trainer.build import label_weights, loader_spec
from trainer.runtime.checkpoint import COMPLETE, load_model, resolve_checkpoint
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.run_files import CONFIG_FILE
from trainer.runtime.sharding import attach_sparse_optimizer, shard_model

logger = logging.getLogger(__name__)


def ranker_schema(manifest: Manifest, config: ExperimentConfig) -> EventSchema:
    """Stored features plus ``data.recent_history``; the history encoder's per-event features
    are a retrieval-model option, never the ranker's (``hist_item_ids`` is mean-pooled)."""
    return with_derived_features(manifest.schema, config.data.recent_history, -1)


def ranker_loader_spec(config: ExperimentConfig, split: str, train: bool) -> LoaderSpec:
    """The retrieval loader's spec without per-event history or impression negatives."""
    return replace(
        loader_spec(config, split, train),
        recency_buckets=-1,
        impression_negatives=0,
        sequence_length=0,
    )


def ranker_first_row_batch(manifest: Manifest, config: ExperimentConfig, split: str) -> Batch:
    """A one-row batch of ``split`` with the ranker's features: padding for a rank that holds
    no rows of it (``trainer.runtime.synchronized``)."""
    paths = manifest.split_paths(config.data.path, split)
    table = read_unit(list_work_units(paths)[0], None).slice(0, 1)
    schema = ranker_schema(manifest, config)
    encoding = FeatureEncoding.from_manifest(manifest.counters, manifest.tables, schema.features)
    return BatchBuilder(schema, config.data.recent_history, encoding=encoding)(table)


def build_unsharded_ranker(
    manifest: Manifest, config: ExperimentConfig, device: torch.device | None = None
) -> Ranker:
    """The plain ranker (tables on ``device``); errors name the config key."""
    try:
        return Ranker(
            ranker_schema(manifest, config),
            dict(manifest.tables),
            config.ranker,
            label_weights(manifest, config),
            device=device,
        )
    except ValueError as error:
        raise ConfigError(f"ranker: {error}") from error


def build_sharded_ranker(
    manifest: Manifest, config: ExperimentConfig, env: DistributedEnv, train: bool = True
) -> DistributedModelParallel:
    """Tables created on ``meta`` and sharded by DMP over the current process group; dense
    layers data-parallel. ``train`` attaches the fused sparse optimizer before sharding."""
    model = build_unsharded_ranker(manifest, config, device=torch.device("meta"))
    if train:
        loop = config.ranker.train
        attach_sparse_optimizer(model, loop.sparse_optimizer, loop.sparse_lr)
    return shard_model(model, config.sharding, env.device, env.world_size)


@dataclass
class RankerExamples:
    """A batch of logged pairs plus sampled negative pairs, as ``Ranker.forward`` takes them.

    Args:
        user_features: KJT, user keys, stride B.
        item_features: KJT, item keys, stride B.
        extra_item_features: KJT, item keys, stride E = B * k (k negatives per row), or None.
        extra_rows: [E] int64 user row of each negative (row b repeated k times), or None.
        labels: [B + E, T] logged labels, then zeros.
        weights: [B + E] the batch's row weights, then the same for each row's negatives, 0
            where a negative is the row's own item (an accidental hit).
        item_ids: [B + E] int64.
    """

    user_features: KeyedJaggedTensor
    item_features: KeyedJaggedTensor
    extra_item_features: KeyedJaggedTensor | None
    extra_rows: torch.Tensor | None
    labels: torch.Tensor
    weights: torch.Tensor
    item_ids: torch.Tensor


def with_sampled_negatives(
    batch: Batch,
    store: ItemFeatureStore | None,
    per_row: int,
    generator: torch.Generator,
) -> RankerExamples:
    """Adds ``per_row`` uniform corpus items per logged row, paired with its user, labels 0.

    Uniform (not popularity) sampling: the ranker must score any corpus item the retrieval
    stage may put in front of it, and popular items are the ones logged rows already show.
    """
    plain = RankerExamples(
        batch.user_features,
        batch.item_features,
        None,
        None,
        batch.labels,
        batch.weight,
        batch.item_ids,
    )
    if per_row == 0 or store is None:
        return plain
    corpus = store.corpus_ids().to(batch.item_ids.device)
    rows = batch.size
    picks = torch.randint(
        len(corpus), (rows * per_row,), generator=generator, device=generator.device
    )
    negatives = corpus[picks.to(corpus.device)]
    extra_rows = torch.arange(rows, device=negatives.device).repeat_interleave(per_row)
    hit = negatives == batch.item_ids[extra_rows]
    weights = batch.weight[extra_rows] * (~hit).float()
    return RankerExamples(
        batch.user_features,
        batch.item_features,
        store.lookup(negatives),
        extra_rows,
        torch.cat([batch.labels, batch.labels.new_zeros(rows * per_row, batch.labels.shape[1])]),
        torch.cat([batch.weight, weights]),
        torch.cat([batch.item_ids, negatives]),
    )


def ranker_run_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The configuration a ranker run was trained with (``config.yaml`` of its run directory;
    ``path`` may be the run directory or one of its ``checkpoints/step-N`` folders)."""
    path = Path(path)
    run_dir = path.parent.parent if (path / COMPLETE).exists() else path
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise ConfigError(f"{config_path}: not a ranker run directory (no config.yaml)")
    return load_config(config_path, overrides or [])


def load_ranker(
    path: str | Path,
    manifest: Manifest,
    env: DistributedEnv | None = None,
    overrides: list[str] | None = None,
) -> Ranker:
    """A trained ranker, frozen (``Ranker.freeze``: eval mode, no autograd) for scoring.

    Args:
        path: a ranker run directory (its latest complete checkpoint) or a checkpoint folder.
        manifest: the dataset the caller feeds it (tables must match the ranker's).
        env: None: one unsharded replica in this process; scoring needs no collectives, so any
            rank may score any number of pairs (the choice for teachers and reward models of
            tables that fit one process). Given: tables sharded by DMP over the current process
            group; every ``score``/``score_items`` call is then collective (all ranks, same
            order). Loading itself is collective whenever a process group exists.
        overrides: ``key=value`` changes to the run's config, e.g. ``loss.label_weights``.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        ConfigError: not a ranker run, or its tables do not match ``manifest``.
    """
    config = ranker_run_config(path, overrides)
    checkpoint = resolve_checkpoint(path)
    model: torch.nn.Module
    if env is None:
        ranker = build_unsharded_ranker(manifest, config)
        model = ranker
    else:
        model = build_sharded_ranker(manifest, config, env, train=False)
        ranker = model.module  # type: ignore[assignment]
    meta = load_model(checkpoint, model)
    logger.info("loaded ranker %s (step %s)", checkpoint, meta.get("step"))
    return ranker.freeze()
