"""Funnel consistency: does retrieval pass on what the ranking stage wants?

For a fixed sample of eval-split rows (``eval.funnel.max_queries``, the same on every rank), the
ranker scores every (query, item) pair of the whole corpus exactly, and retrieval ranks the
corpus by exact MIPS (no seen-item exclusion on either side, so both see the same candidates):

- ``overlap@K``: |retrieval top-N ∩ ranker top-K| / K, N = ``eval.funnel.retrieve_n``: the share
  of the ranker's K favourites that survive retrieval (1.0: retrieval never loses one).
- ``ranker_ndcg@K``: NDCG of retrieval's top-K with the ranker's expected NUV as the gain, against
  the ideal order (the ranker's own top-K).
- With a synthetic world's ground truth (``truth/`` in the manifest): ``truth_overlap@K`` and
  ``truth_ndcg@K`` of retrieval, gain = sigmoid(u·v + item bias), the click probability of an
  examined item; and ``ranker_truth_ndcg@K``, the ranker's own, for reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from config import ExperimentConfig
from data_pipeline.batch import BatchBuilder
from data_pipeline.feature_encoding import FeatureEncoding
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from data_pipeline.split_table import read_split_columns
from trainer.evaluation.corpus import rank_rows
from trainer.features import ResolvedFeatures
from trainer.mips import shard_range
from trainer.ranker_build import load_ranker, ranker_run_config, ranker_schema
from trainer.runtime.distributed import DistributedEnv

logger = logging.getLogger(__name__)


def overlap_at(retrieved: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """[Q] |retrieved ∩ reference[:, :k]| / k.

    Args:
        retrieved: [Q, N] item ids retrieval passes on.
        reference: [Q, >= k] item ids, best first, of the stage downstream.
    """
    top = reference[:, :k]
    hits = (top.unsqueeze(2) == retrieved.unsqueeze(1)).any(dim=2)
    return hits.double().sum(dim=1) / k


def ndcg_against(ranked_gains: torch.Tensor, all_gains: torch.Tensor, k: int) -> torch.Tensor:
    """[Q] NDCG@k of a ranking whose items have ``ranked_gains``.

    Args:
        ranked_gains: [Q, >= k] gains (>= 0) of the ranked items, in ranked order.
        all_gains: [Q, N] gains of every corpus item (the ideal takes the k largest).
    """
    discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    dcg = (ranked_gains[:, :k].double() * discounts).sum(dim=1)
    ideal = (all_gains.double().topk(k, dim=1).values * discounts).sum(dim=1)
    return torch.where(ideal > 0, dcg / ideal.clamp_min(1e-30), torch.zeros_like(dcg))


def sample_queries(table: pa.Table, max_queries: int, seed: int) -> pa.Table:
    """Up to ``max_queries`` rows of ``table`` (a fixed seeded sample, in row order)."""
    if table.num_rows <= max_queries:
        return table
    keep = np.sort(np.random.default_rng([seed, 7]).choice(table.num_rows, max_queries, False))
    return table.take(keep)


def _ranker_gains(
    ranker: Any, rows: pa.Table, manifest: Manifest, ranker_config: ExperimentConfig, store: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranker NUV of every (row, corpus item): ([Q, N] gains, [N] corpus ids)."""
    corpus_ids = store.corpus_ids()
    schema = ranker_schema(manifest, ranker_config)
    encoding = FeatureEncoding.from_manifest(manifest.counters, manifest.tables, schema.features)
    builder = BatchBuilder(schema, ranker_config.data.recent_history, encoding=encoding)
    users = builder(rows).user_features
    logits = ranker.score_items(users, store.lookup(corpus_ids))
    gains = (torch.sigmoid(logits) * ranker.label_weights).sum(dim=-1)
    return gains, corpus_ids


def _truth_gains(root: str, manifest: Manifest, users: np.ndarray) -> torch.Tensor | None:
    """[Q, M] sigmoid(u·v + b) from a synthetic world's truth arrays, None without them."""
    truth = manifest.extra.get("truth") if isinstance(manifest.extra, dict) else None
    if not truth:
        return None
    arrays = {name: np.load(Path(root) / info["path"]) for name, info in truth.items()}
    relevance = arrays["user_factors"][users] @ arrays["item_factors"].T + arrays["item_bias"]
    return torch.sigmoid(torch.from_numpy(relevance).double())


def funnel_metrics(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    split: str,
    features: ResolvedFeatures | None = None,
) -> dict[str, float]:
    """Collective. Funnel metrics of ``model`` against ``config.eval.funnel.ranker``."""
    spec = config.eval.funnel
    assert spec.ranker is not None
    ranker = load_ranker(spec.ranker, manifest, overrides=_label_weights(config))
    ranker_config = ranker_run_config(spec.ranker)
    all_rows = _split_rows(config, manifest, split)
    rows = sample_queries(all_rows, spec.max_queries, config.seed)
    start, end = shard_range(rows.num_rows, env.rank, env.world_size)
    mine = rows.slice(start, end - start)
    n = max(spec.retrieve_n, *spec.ks)
    _, retrieved = rank_rows(model, manifest, config, env, mine, n, features)
    retrieved = retrieved.cpu()
    store = ItemFeatureStore.load(config.data.path, manifest)
    local: dict[str, torch.Tensor] = {}
    if mine.num_rows:
        gains, corpus_ids = _ranker_gains(ranker, mine, manifest, ranker_config, store)
        ranker_top = corpus_ids[gains.topk(max(spec.ks), dim=1).indices]
        dense = torch.zeros(mine.num_rows, manifest.tables["item_id"], dtype=torch.float64)
        dense[:, corpus_ids] = gains.double()
        local.update(_scores("", retrieved, ranker_top, dense, spec.retrieve_n, spec.ks))
        users = mine.column("user_id").to_numpy()
        truth = _truth_gains(config.data.path, manifest, users)
        if truth is not None:
            truth_top = truth.topk(max(spec.ks), dim=1).indices
            local.update(_scores("truth_", retrieved, truth_top, truth, spec.retrieve_n, spec.ks))
            ranked_by_ranker = torch.gather(truth, 1, ranker_top)
            for k in spec.ks:
                local[f"ranker_truth_ndcg@{k}"] = ndcg_against(ranked_by_ranker, truth, k)
    return _mean_over_ranks(local, mine.num_rows, env)


def _scores(
    prefix: str,
    retrieved: torch.Tensor,
    reference_top: torch.Tensor,
    dense_gains: torch.Tensor,
    retrieve_n: int,
    ks: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Per-query overlap@K and NDCG@K of ``retrieved`` [Q, >= N] against one reference."""
    out: dict[str, torch.Tensor] = {}
    ranked_gains = torch.gather(dense_gains, 1, retrieved.clamp_min(0))
    for k in ks:
        out[f"{prefix}overlap@{k}"] = overlap_at(retrieved[:, :retrieve_n], reference_top, k)
        name = f"{prefix}ndcg@{k}" if prefix else f"ranker_ndcg@{k}"
        out[name] = ndcg_against(ranked_gains, dense_gains, k)
    return out


def _mean_over_ranks(
    local: dict[str, torch.Tensor], count: int, env: DistributedEnv
) -> dict[str, float]:
    """Means over every rank's queries; a rank without queries holds no names and adds 0."""
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, sorted(local))
    names = max(gathered, key=len)
    values = [float(local[n].sum()) if n in local else 0.0 for n in names]
    sums = torch.tensor([*values, float(count)], dtype=torch.float64, device=env.device)
    dist.all_reduce(sums)
    total = float(sums[-1])
    result = {name: float(value) / max(total, 1.0) for name, value in zip(names, sums.tolist())}
    result["queries"] = total
    return result


def _split_rows(config: ExperimentConfig, manifest: Manifest, split: str) -> pa.Table:
    names = manifest.schema.event_arrow_schema().names
    return read_split_columns(config.data.path, manifest, split, names)


def _label_weights(config: ExperimentConfig) -> list[str]:
    """The retrieval run's NUV weights apply to the ranker's labels too."""
    weights = ", ".join(f"{k}: {v}" for k, v in config.loss.label_weights.items())
    return [f"loss.label_weights={{{weights}}}"]
