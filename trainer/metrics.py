"""Retrieval metrics and the most-popular baseline, as pure functions of id tensors.

Every per-query metric is averaged over the queries that have at least one relevant item (NaN
when there are none); catalog coverage is over all queries. Relevance is binary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.mips import ItemLists


@dataclass(frozen=True)
class MetricCutoffs:
    """The K's of each metric; the retrieved lists must be at least as long as the largest."""

    hit_rate: tuple[int, ...] = (10,)
    recall: tuple[int, ...] = (10, 50, 100)
    ndcg: tuple[int, ...] = (10, 50)
    coverage: tuple[int, ...] = (10,)

    @property
    def largest(self) -> int:
        return max((*self.hit_rate, *self.recall, *self.ndcg, *self.coverage), default=1)


def retrieval_metrics(
    topk_ids: torch.Tensor,
    targets: torch.Tensor | ItemLists,
    num_items: int,
    cutoffs: MetricCutoffs = MetricCutoffs(),
) -> dict[str, float]:
    """HR@k, Recall@k, NDCG@k, MRR and catalog coverage@k of ranked retrieval results.

    Args:
        topk_ids: [Q, K] int64 ranked item ids per query, distinct within a row; -1 = no item.
        targets: [Q] int64 one relevant item per query, or Q lists of relevant item ids.
        num_items: catalog size (coverage denominator).
        cutoffs: the K's to report; K must be >= cutoffs.largest.
    Returns:
        {"hr@10", "recall@10", "recall@50", "recall@100", "ndcg@10", "ndcg@50", "mrr",
        "coverage@10"} for the default cutoffs, as Python floats.
    """
    if topk_ids.dim() != 2 or topk_ids.shape[1] < cutoffs.largest:
        raise ValueError(
            f"topk_ids must be [Q, K] with K >= {cutoffs.largest}, got {tuple(topk_ids.shape)}"
        )
    relevant, num_relevant = relevance_matrix(topk_ids, targets)
    evaluated = num_relevant > 0
    relevant, num_relevant = relevant[evaluated].double(), num_relevant[evaluated].double()
    metrics: dict[str, float] = {}
    for k in cutoffs.hit_rate:
        metrics[f"hr@{k}"] = _mean(relevant[:, :k].amax(dim=1))
    for k in cutoffs.recall:
        metrics[f"recall@{k}"] = _mean(relevant[:, :k].sum(dim=1) / num_relevant)
    for k in cutoffs.ndcg:
        metrics[f"ndcg@{k}"] = _mean(ndcg_at_k(relevant, num_relevant, k))
    metrics["mrr"] = _mean(reciprocal_rank(relevant))
    for k in cutoffs.coverage:
        metrics[f"coverage@{k}"] = catalog_coverage(topk_ids[:, :k], num_items)
    return metrics


def relevance_matrix(
    topk_ids: torch.Tensor, targets: torch.Tensor | ItemLists
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which retrieved items are relevant, and how many relevant items each query has.

    Args:
        topk_ids: [Q, K] int64 (-1 never relevant).
        targets: [Q] int64 single targets, or Q lists of relevant ids (duplicates counted once).
    Returns:
        relevant [Q, K] bool, num_relevant [Q] int64.
    """
    num_queries = topk_ids.shape[0]
    if isinstance(targets, torch.Tensor):
        if tuple(targets.shape) != (num_queries,):
            raise ValueError(f"targets must be [{num_queries}], got {tuple(targets.shape)}")
        relevant = (topk_ids == targets.unsqueeze(1)) & (topk_ids >= 0)
        return relevant, (targets >= 0).long()
    if targets.num_lists != num_queries:
        raise ValueError(f"targets has {targets.num_lists} lists for {num_queries} queries")
    # Key (query, id + 1) as one int64 so membership is a single isin; ids are >= -1.
    stride = max(_max_or(topk_ids, -1), _max_or(targets.ids, -1)) + 2
    queries = torch.arange(num_queries, device=topk_ids.device).unsqueeze(1)
    retrieved_keys = queries * stride + topk_ids + 1
    relevant_keys = torch.unique(targets.rows() * stride + targets.ids + 1)
    relevant = torch.isin(retrieved_keys, relevant_keys) & (topk_ids >= 0)
    num_relevant = torch.bincount(relevant_keys // stride, minlength=num_queries)
    return relevant, num_relevant


def ndcg_at_k(relevant: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """Binary-relevance NDCG@k [Q]; ideal DCG over min(num_relevant, k) hits.

    Args:
        relevant: [Q, K] 0/1 float64, num_relevant: [Q] (> 0).
    """
    discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    discounts = discounts.to(relevant.device)
    dcg = (relevant[:, :k] * discounts[: relevant[:, :k].shape[1]]).sum(dim=1)
    ideal_cumulative = torch.cumsum(discounts, 0)
    ideal = ideal_cumulative[num_relevant.clamp(1, k).long() - 1]
    return dcg / ideal


def reciprocal_rank(relevant: torch.Tensor) -> torch.Tensor:
    """1 / (1-based rank of the first relevant item) [Q]; 0 when none in the K retrieved.

    Args:
        relevant: [Q, K] 0/1.
    """
    ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64, device=relevant.device)
    return (relevant.double() / ranks).amax(dim=1)


def catalog_coverage(topk_ids: torch.Tensor, num_items: int) -> float:
    """Fraction of the ``num_items`` catalog appearing in any row of topk_ids [Q, k] (-1 ignored)."""
    if num_items <= 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    shown = torch.unique(topk_ids[topk_ids >= 0])
    return shown.numel() / num_items


def popularity_topk(
    item_counts: torch.Tensor,
    num_queries: int,
    k: int,
    exclude: ItemLists | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Most-popular baseline: every query gets the k most counted items it may be shown.

    Same contract as ``trainer.mips.exact_topk`` with score = count: ties by lower id, the
    query's ``exclude`` items (e.g. training history) removed, padding score -inf and id -1.

    Args:
        item_counts: [N] interaction counts; item ids are 0..N-1.
        num_queries: Q.
        k: results per query.
        exclude: Q lists of item ids not to recommend to that query.
    Returns:
        scores [Q, k] float32 (the counts), ids [Q, k] int64.
    """
    if exclude is not None and exclude.num_lists != num_queries:
        raise ValueError(f"exclude has {exclude.num_lists} lists for {num_queries} queries")
    counts = item_counts.double()
    # Stable descending sort of counts = (count desc, id asc).
    ranking = torch.sort(counts, descending=True, stable=True).indices
    longest_exclusion = 0 if exclude is None else _max_or(exclude.lengths(), 0)
    candidates = ranking[: k + longest_exclusion].expand(num_queries, -1)  # [Q, k + m]
    if exclude is not None:
        banned = relevance_matrix(candidates, exclude)[0]
        # Stable sort on the banned flag moves allowed items first, keeping popularity order.
        order = torch.sort(banned.to(torch.uint8), dim=1, stable=True).indices
        candidates = torch.where(banned, -1, candidates).gather(1, order)
    ids = torch.full((num_queries, k), -1, dtype=torch.int64, device=item_counts.device)
    width = min(k, candidates.shape[1])
    ids[:, :width] = candidates[:, :width]
    scores = torch.where(ids >= 0, counts[ids.clamp_min(0)], -math.inf).float()
    return scores, ids


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _max_or(values: torch.Tensor, default: int) -> int:
    return int(values.max()) if values.numel() else default
