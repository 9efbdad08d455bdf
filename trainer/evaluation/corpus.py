"""The model's two sides over whole splits: this rank's slice of the item corpus through the item
tower, this rank's evaluation queries through the user tower, and exact top-k of given rows
(shared by evaluation, funnel metrics, mined negatives and export)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from config import ExperimentConfig
from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from data_pipeline.schema import ITEM_ID, Side
from data_pipeline.split_table import read_split_columns
from trainer.build import batch_builder, loader_spec
from trainer.features import ResolvedFeatures
from trainer.mips import distributed_topk, shard_range
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.synchronized import synchronized


@torch.no_grad()
def embed_corpus(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    features: ResolvedFeatures | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the item corpus through the item tower (``features``:
    the job's resolved features, resolved here when None).

    Returns: (item ids [n_r] int64, embeddings [n_r, D]). Every rank runs the same number of
    forward calls (sharded tables need matched collectives).
    """
    items = read_split_columns(
        config.data.path, manifest, "items", manifest.schema.side_arrow_schema(Side.ITEM).names
    )
    items = items.sort_by(ITEM_ID)
    start, stop = shard_range(items.num_rows, env.rank, env.world_size)
    local = items.slice(start, stop - start)
    per_rank = -(-items.num_rows // env.world_size)
    calls = max(1, -(-per_rank // config.data.eval_batch_size))
    build = batch_builder(manifest, config, features)
    outputs = []
    for piece in np.array_split(np.arange(local.num_rows), calls):
        real = len(piece) > 0
        table = local.take(piece) if real else items.slice(0, 1)
        batch = build(table).to(env.device)
        item_embeddings = model(batch.user_features, batch.item_features).item
        if real:
            outputs.append(item_embeddings.float())
    ids = torch.from_numpy(local.column(ITEM_ID).to_numpy().astype(np.int64))
    dim = config.model.output_dim
    embeddings = torch.cat(outputs) if outputs else torch.zeros(0, dim, device=env.device)
    return ids.to(env.device), embeddings


@dataclass
class Queries:
    """This rank's evaluation queries: ``users``, ``targets``, ``times`` [q_r] int64,
    ``embeddings`` [q_r, D], and the light head's ``ranker`` embeddings [q_r, NU, D] (None
    without the head)."""

    users: torch.Tensor
    targets: torch.Tensor
    times: torch.Tensor
    embeddings: torch.Tensor
    ranker: torch.Tensor | None


@torch.no_grad()
def embed_queries(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    split: str,
    features: ResolvedFeatures | None = None,
) -> Queries:
    """This rank's share of the eval split through the user tower."""
    spec = loader_spec(config, split, False, manifest, features)
    loader = build_event_loader(spec, manifest, env.rank, env.world_size)
    users, targets, times, embeddings, ranker = [], [], [], [], []
    fallback = functools.partial(first_row_batch, manifest, config, split, features)
    for batch in synchronized(loader, env, fallback):
        outputs = model(batch.user_features, batch.item_features)
        real = batch.weight > 0
        users.append(batch.user_ids[real])
        targets.append(batch.item_ids[real])
        times.append(batch.timestamp[real])
        embeddings.append(outputs.user[real].float())
        if outputs.ranker_user is not None:
            ranker.append(outputs.ranker_user[real].float())
    ranker_queries = torch.cat(ranker) if ranker else None
    if not embeddings:
        empty = torch.zeros(0, dtype=torch.int64, device=env.device)
        dim = config.model.output_dim
        if config.model.light_head.enabled:
            heads = config.model.light_head.num_embeddings
            ranker_queries = torch.zeros(0, heads, dim, device=env.device)
        return Queries(empty, empty, empty, torch.zeros(0, dim, device=env.device), ranker_queries)
    return Queries(
        torch.cat(users),
        torch.cat(targets),
        torch.cat(times),
        torch.cat(embeddings),
        ranker_queries,
    )


@torch.no_grad()
def rank_rows(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    rows: pa.Table,
    k: int,
    features: ResolvedFeatures | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation's top-``k`` for given event rows, without the seen-item exclusion: queries
    through the model's forward in batches of ``eval_batch_size`` (as ``embed_queries``), corpus
    from ``embed_corpus``, exact sharded MIPS. Collective; each rank ranks its own ``rows``.

    Returns: scores [Q, k] float32, item ids [Q, k] int64.
    """
    corpus_ids, corpus = embed_corpus(model, manifest, config, env, features)
    build = batch_builder(manifest, config, features)
    queries = [torch.zeros(0, config.model.output_dim, device=env.device)]
    for start in range(0, rows.num_rows, config.data.eval_batch_size):
        batch = build(rows.slice(start, config.data.eval_batch_size)).to(env.device)
        queries.append(model(batch.user_features, batch.item_features).user.float())
    return distributed_topk(
        torch.cat(queries),
        corpus,
        corpus_ids,
        k,
        query_chunk=config.eval.query_chunk,
        corpus_chunk=config.eval.corpus_chunk,
    )


def first_row_batch(
    manifest: Manifest,
    config: ExperimentConfig,
    split: str,
    features: ResolvedFeatures | None = None,
) -> Batch:
    """A one-row batch of ``split``: padding for a rank that holds no rows of it."""
    paths = manifest.split_paths(config.data.path, split)
    # The first non-empty row group: a split may begin with an empty file.
    table = read_unit(list_work_units(paths)[0], None).slice(0, 1)
    return batch_builder(manifest, config, features)(table)
