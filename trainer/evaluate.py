"""Evaluation: exact top-K over the whole item corpus, sharded over ranks, against a most-popular
baseline computed the same way (same queries, same exclusions, same metrics).

Protocol: one query per row of the eval split (user features and history as of that event); the
target is the row's item. Items the user interacted with in earlier splits (train, and valid when
evaluating test) are excluded from the ranking, except the target itself.

Tail recall (``tail_recall@K`` for every K in ``eval.ks``, plus the ``tail_queries`` fraction) is
recall over the queries whose target is a long-tail item: outside the ``HEAD_FRACTION`` (20%)
most popular of the items with any training interaction (``trainer.metrics.tail_items``).
Cold recall (``cold_recall@K``, ``cold_queries``) is the same over the queries whose target has
fewer than ``eval.cold_item_max_events`` training events (``trainer.metrics.cold_items``).
``tail_rows`` and ``cold_rows`` count those queries over all ranks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from data_pipeline.schema import ITEM_ID, USER_ID, SchemaError, Side
from models.light_ranker import head_module
from trainer.build import batch_builder, label_weights, loader_spec
from trainer.config import ExperimentConfig
from trainer.distributed import DistributedEnv
from trainer.light_rerank import pad_columns, reranked_topk
from trainer.metrics import (
    HEAD_FRACTION,
    MetricCutoffs,
    cold_items,
    retrieval_metrics,
    tail_items,
)
from trainer.mips import ItemLists, distributed_topk, shard_range
from trainer.synchronized import synchronized

logger = logging.getLogger(__name__)

# Splits besides train whose events come before a split's events (test follows valid).
EARLIER_SPLITS = {"test": ("valid",)}


def read_split_columns(
    root: str, manifest: Manifest, split: str, columns: Sequence[str]
) -> pa.Table:
    """Whole-split read of a few columns (corpus and user/item id pairs, not event features).

    Raises:
        SchemaError: a file is unreadable or corrupt (names the file).
    """
    tables = []
    for path in manifest.split_paths(root, split):
        try:
            tables.append(
                pq.read_table(path, columns=list(columns), page_checksum_verification=True)
            )
        except (OSError, pa.ArrowException) as error:
            raise SchemaError(
                f"{path}: could not read columns {list(columns)} ({error})"
            ) from error
    return pa.concat_tables(tables)


@torch.no_grad()
def embed_corpus(
    model: torch.nn.Module, manifest: Manifest, config: ExperimentConfig, env: DistributedEnv
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the item corpus through the item tower.

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
    build = batch_builder(manifest, config)
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


@torch.no_grad()
def embed_queries(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    split: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's share of the eval split through the user tower.

    Returns: (user ids [q_r], target item ids [q_r], query embeddings [q_r, D], light-head
    ranker embeddings [q_r, NU, D] or None without the head).
    """
    loader = build_event_loader(
        loader_spec(config, split, False, manifest), manifest, env.rank, env.world_size
    )
    users, targets, embeddings, ranker = [], [], [], []
    for batch in synchronized(loader, env, lambda: first_row_batch(manifest, config, split)):
        outputs = model(batch.user_features, batch.item_features)
        real = batch.weight > 0
        users.append(batch.user_ids[real])
        targets.append(batch.item_ids[real])
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
        return empty, empty, torch.zeros(0, dim, device=env.device), ranker_queries
    return torch.cat(users), torch.cat(targets), torch.cat(embeddings), ranker_queries


@torch.no_grad()
def rank_rows(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    rows: pa.Table,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation's top-``k`` for given event rows, without the seen-item exclusion: queries
    through the model's forward in batches of ``eval_batch_size`` (as ``embed_queries``), corpus
    from ``embed_corpus``, exact sharded MIPS. Collective; each rank ranks its own ``rows``.

    Returns: scores [Q, k] float32, item ids [Q, k] int64.
    """
    corpus_ids, corpus = embed_corpus(model, manifest, config, env)
    build = batch_builder(manifest, config)
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


def first_row_batch(manifest: Manifest, config: ExperimentConfig, split: str) -> Batch:
    """A one-row batch of ``split``: padding for a rank that holds no rows of it."""
    paths = manifest.split_paths(config.data.path, split)
    # The first non-empty row group: a split may begin with an empty file.
    table = read_unit(list_work_units(paths)[0], None).slice(0, 1)
    return batch_builder(manifest, config)(table)


def earlier_pairs(
    config: ExperimentConfig, manifest: Manifest, split: str, train_pairs: pa.Table
) -> pa.Table:
    """(user_id, item_id) of every event before ``split``: train, plus valid for test."""
    if split == config.data.train_split:
        return train_pairs.slice(0, 0)
    extra = [
        read_split_columns(config.data.path, manifest, s, [USER_ID, ITEM_ID])
        for s in EARLIER_SPLITS.get(split, ())
    ]
    return pa.concat_tables([train_pairs, *extra])


def seen_items(
    pairs: pa.Table, user_ids: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the items its user has in ``pairs`` (user_id, item_id), minus the query's own
    target. Returns CSR (offsets [q+1] int64, ids [nnz] int64)."""
    users = pairs.column(USER_ID).to_numpy()
    items = pairs.column(ITEM_ID).to_numpy()
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    starts = np.searchsorted(users, user_ids, side="left")
    stops = np.searchsorted(users, user_ids, side="right")
    chunks = [
        np.unique(items[a:b][items[a:b] != t])
        for a, b, t in zip(starts, stops, targets, strict=True)
    ]
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    ids = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)
    return offsets, ids


def popularity_scores(train_pairs: pa.Table, num_items: int) -> np.ndarray:
    """[N] training interaction counts: the most-popular baseline's item scores."""
    items = train_pairs.column(ITEM_ID).to_numpy()
    return np.bincount(items, minlength=num_items).astype(np.float32)


def _reduce_metrics(local: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Means over every rank's queries, not means of rank means: each rank's mean is weighted by
    the queries it averaged over, ``count`` or, for ``<subset>_recall@k``, its
    ``<subset>_rows`` (so subset recall is all ranks' hits over all ranks' rows). The
    ``<subset>_rows`` are summed. NaN where no rank had any such query. Coverage is not a mean
    and is reduced elsewhere."""
    rows = {key: int(value) for key, value in local.items() if key.endswith("_rows")}
    keys = [k for k in local if not k.startswith("coverage") and k not in rows]
    weights = [_weight(key, count, rows) for key in keys]
    # A rank without such queries holds NaN (or a placeholder) there: it must add 0, not NaN * 0.
    sums = [local[k] * w if w else 0.0 for k, w in zip(keys, weights, strict=True)]
    values = torch.tensor(sums + weights + list(rows.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    sums = values[: len(keys)].tolist()
    totals = values[len(keys) : 2 * len(keys)].tolist()
    result = {k: s / t if t > 0 else math.nan for k, s, t in zip(keys, sums, totals, strict=True)}
    row_totals = values[2 * len(keys) :].tolist()
    result |= {key: int(total) for key, total in zip(rows, row_totals, strict=True)}
    return result


def _weight(key: str, count: int, rows: dict[str, int]) -> int:
    """The number of queries behind a rank's ``key`` mean: its subset's rows for subset recall."""
    subset, separator, _ = key.partition("_recall@")
    return rows[f"{subset}_rows"] if separator else count


def _coverage(top10: torch.Tensor, num_items: int, device: torch.device) -> float:
    seen = torch.zeros(num_items, dtype=torch.int32, device=device)
    valid = top10[top10 >= 0]
    seen[valid] = 1
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return float(seen.sum().item()) / num_items


def cutoffs_for(ks: Sequence[int]) -> MetricCutoffs:
    """HR@10, Recall@each K, NDCG@K for K <= 50, coverage@10, tail and cold Recall@each K."""
    return MetricCutoffs(
        hit_rate=(10,),
        recall=tuple(ks),
        ndcg=tuple(k for k in ks if k <= 50) or (min(ks),),
        coverage=(10,),
        tail_recall=tuple(ks),
        cold_recall=tuple(ks),
    )


def _score_ranking(
    topk_ids: torch.Tensor,
    targets: torch.Tensor,
    ks: Sequence[int],
    num_items: int,
    tail: torch.Tensor,
    cold: torch.Tensor,
    device: torch.device,
) -> dict[str, float]:
    """Metrics over all ranks' queries (means weighted by each rank's query count).

    Args:
        topk_ids: [q_r, K] this rank's ranked ids; targets: [q_r] int64.
        tail: [num_items] bool long-tail mask, the same on every rank.
        cold: [num_items] bool cold-item mask, the same on every rank.
    """
    cutoffs = cutoffs_for(ks)
    tail, cold = tail.cpu(), cold.cpu()
    if len(targets):
        local = retrieval_metrics(topk_ids.cpu(), targets.cpu(), num_items, cutoffs, tail, cold)
    else:
        placeholder = torch.zeros(1, max(ks), dtype=torch.int64)
        one_target = torch.zeros(1, dtype=torch.int64)
        local = dict.fromkeys(
            retrieval_metrics(placeholder, one_target, num_items, cutoffs, tail, cold), 0.0
        )
    result = _reduce_metrics(local, len(targets), device)
    result["coverage@10"] = _coverage(topk_ids[:, :10], num_items, device)
    return result


def evaluate_model(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    run_dir: Path,
    split: str | None = None,
) -> dict[str, Any]:
    """Collective. Writes ``metrics.json`` (rank 0) and returns {model, popularity, ...}; with
    the light ranking head also ``reranked``: the metrics of ``model.light_head.num_items``
    items reranked by the head out of ``num_knn_items`` retrieved (cutoffs beyond num_items
    count only those items)."""
    split = split or config.eval.split
    model.eval()
    k = max(config.eval.ks)
    num_items = manifest.tables["item_id"]
    corpus_ids, corpus = embed_corpus(model, manifest, config, env)
    users, targets, queries, ranker_queries = embed_queries(model, manifest, config, env, split)
    train_pairs = read_split_columns(
        config.data.path, manifest, config.data.train_split, [USER_ID, ITEM_ID]
    )
    excluded_pairs = (
        earlier_pairs(config, manifest, split, train_pairs)
        if config.eval.exclude_seen
        else train_pairs.slice(0, 0)
    )
    offsets, excluded = seen_items(excluded_pairs, users.cpu().numpy(), targets.cpu().numpy())
    exclude = ItemLists(torch.from_numpy(offsets), torch.from_numpy(excluded))
    _, topk_ids = distributed_topk(
        queries,
        corpus,
        corpus_ids,
        k,
        exclude=exclude,
        query_chunk=config.eval.query_chunk,
        corpus_chunk=config.eval.corpus_chunk,
    )
    counts = popularity_scores(train_pairs, num_items)
    tail = torch.from_numpy(tail_items(counts, HEAD_FRACTION))
    cold = torch.from_numpy(cold_items(counts, config.eval.cold_item_max_events))
    ks = config.eval.ks
    model_metrics = _score_ranking(topk_ids, targets, ks, num_items, tail, cold, env.device)
    results = {
        "split": split,
        "num_items": num_items,
        "head_fraction": HEAD_FRACTION,
        "cold_item_max_events": config.eval.cold_item_max_events,
        "model": model_metrics,
    }
    head = head_module(model)
    if head is not None and ranker_queries is not None:
        weights = label_weights(manifest, config)
        _, reranked = reranked_topk(
            head, queries, ranker_queries, corpus_ids, corpus, weights, config, exclude
        )
        results["reranked"] = _score_ranking(
            pad_columns(reranked, k), targets, ks, num_items, tail, cold, env.device
        )
    popularity = torch.from_numpy(counts)
    _, pop_ids = distributed_topk(
        torch.ones(len(targets), 1, device=env.device),
        popularity[corpus_ids.cpu()].unsqueeze(1).to(env.device),
        corpus_ids,
        k,
        exclude=exclude,
    )
    results["popularity"] = _score_ranking(pop_ids, targets, ks, num_items, tail, cold, env.device)
    count = torch.tensor([len(targets)], device=env.device)
    dist.all_reduce(count)
    results["num_queries"] = int(count.item())
    if config.eval.funnel.ranker is not None:
        from trainer.funnel import funnel_metrics

        results["funnel"] = funnel_metrics(model, manifest, config, env, split)
    if env.is_main:
        if model_metrics["cold_rows"] == 0:
            logger.warning(
                "no %s query has a cold target (fewer than %d training events): cold_recall@K is NaN",
                split,
                config.eval.cold_item_max_events,
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        logger.info("evaluation on %s:\n%s", split, format_table(results))
    model.train()
    return results


def format_table(results: dict[str, Any]) -> str:
    """Metric rows, model vs. most-popular baseline (and the light head's reranked list)."""
    names = list(results["model"])
    reranked = results.get("reranked")
    header = f"{'metric':<14}{'two-tower':>12}{'most-popular':>14}{'ratio':>9}"
    lines = [header + (f"{'reranked':>11}" if reranked else "")]
    for name in names:
        ours, base = results["model"][name], results["popularity"].get(name, float("nan"))
        ratio = ours / base if base else float("inf")
        line = f"{name:<14}{ours:>12.4f}{base:>14.4f}{ratio:>9.2f}"
        if reranked:
            line += f"{reranked.get(name, float('nan')):>11.4f}"
        lines.append(line)
    lines.append(
        f"({results['num_queries']} queries on '{results['split']}', {results['num_items']} items)"
    )
    if "funnel" in results:
        lines.append("funnel consistency against the ranker:")
        lines += [f"  {name:<22}{value:>10.4f}" for name, value in results["funnel"].items()]
    return "\n".join(lines)
