"""Retrieval metrics and the most-popular baseline, as pure functions of id tensors.

Every per-query metric is averaged over the queries that have at least one relevant item (NaN
when there are none); catalog coverage is over all queries. Relevance is binary.

Tail recall is recall restricted to long-tail items (``tail_items``): relevant items in the head
are dropped, and the mean is over the queries left with at least one relevant (tail) item. With
one target per query that is recall@k over the queries whose target is a tail item. Cold recall
is the same restriction to cold items (``cold_items``: fewer than a given number of training
events).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

from trainer.mips import ItemLists

# Share of the interacted items that counts as the popular head; the rest is the tail.
HEAD_FRACTION = 0.2


@dataclass(frozen=True)
class MetricCutoffs:
    """The K's of each metric; the retrieved lists must be at least as long as the largest."""

    hit_rate: tuple[int, ...] = (10,)
    recall: tuple[int, ...] = (10, 50, 100)
    ndcg: tuple[int, ...] = (10, 50)
    coverage: tuple[int, ...] = (10,)
    # Reported only when retrieval_metrics is given a tail (cold) mask; None = the recall cutoffs.
    tail_recall: tuple[int, ...] | None = None
    cold_recall: tuple[int, ...] | None = None

    @property
    def tail_recall_cutoffs(self) -> tuple[int, ...]:
        return self.recall if self.tail_recall is None else self.tail_recall

    @property
    def cold_recall_cutoffs(self) -> tuple[int, ...]:
        return self.recall if self.cold_recall is None else self.cold_recall

    @property
    def largest(self) -> int:
        cutoffs = (*self.hit_rate, *self.recall, *self.ndcg, *self.coverage)
        subsets = (*self.tail_recall_cutoffs, *self.cold_recall_cutoffs)
        return max((*cutoffs, *subsets), default=1)


def tail_items(counts: np.ndarray, head_fraction: float = HEAD_FRACTION) -> np.ndarray:
    """Long-tail mask: every item outside the popular head.

    The head is the ``ceil(head_fraction * P)`` most counted items, where P is the number of
    items with a count > 0, ordered by count descending then item id ascending (so ties at the
    head boundary go to the lower ids). Items never interacted with (count 0) are always tail;
    with P = 0 every item is tail.

    Args:
        counts: [N] non-negative interaction counts (e.g. ``popularity_scores``); ids 0..N-1.
        head_fraction: in [0, 1].
    Returns:
        [N] bool, True for tail items.
    """
    if counts.ndim != 1:
        raise ValueError(f"counts must be [N], got shape {counts.shape}")
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in [0, 1], got {head_fraction}")
    values = counts.astype(np.float64)
    if (values < 0).any():
        raise ValueError("counts must be >= 0")
    interacted = int((values > 0).sum())
    # Rounding first keeps float noise (0.2 * 15 = 3.0000000000000004) from adding an item.
    head_size = math.ceil(round(head_fraction * interacted, 9))
    head = np.argsort(-values, kind="stable")[:head_size]  # stable: equal counts by lower id
    tail = np.ones(len(values), dtype=bool)
    tail[head] = False
    return tail


def cold_items(counts: np.ndarray, max_events: int) -> np.ndarray:
    """Cold-item mask: items with fewer than ``max_events`` training events (never-seen included).

    Args:
        counts: [N] non-negative training event counts (e.g. ``popularity_scores``); ids 0..N-1.
        max_events: >= 1; an item with ``count < max_events`` is cold.
    Returns:
        [N] bool, True for cold items.
    """
    if counts.ndim != 1:
        raise ValueError(f"counts must be [N], got shape {counts.shape}")
    if max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    return np.asarray(counts < max_events, dtype=bool)


@dataclass(frozen=True)
class QueryValues:
    """One metric per query: ``values`` [Q] float64 and ``included`` [Q] bool, the queries its
    mean is over (those with a relevant item; for subset recall, with a relevant subset item)."""

    values: torch.Tensor
    included: torch.Tensor

    def mean(self) -> float:
        return _mean(self.values[self.included])


def per_query_metrics(
    topk_ids: torch.Tensor,
    targets: torch.Tensor | ItemLists,
    cutoffs: MetricCutoffs = MetricCutoffs(),
    tail: torch.Tensor | None = None,
    cold: torch.Tensor | None = None,
) -> dict[str, QueryValues]:
    """Every per-query metric of :func:`retrieval_metrics` (all but coverage and the row counts),
    before averaging: what a mean, a sum over ranks and a bootstrap over queries are taken of.

    Args:
        topk_ids: [Q, K] int64 ranked item ids per query, distinct within a row; -1 = no item.
        targets: [Q] int64 one relevant item per query, or Q lists of relevant item ids.
        cutoffs: the K's to report; K must be >= cutoffs.largest.
        tail, cold: [num_items] bool item masks, or None for no such subset metrics.
    Returns:
        {"hr@10", "recall@K", "ndcg@K", "mrr@<K of topk_ids>", and with a mask
        "<subset>_recall@K", "<subset>_queries"}: :class:`QueryValues` over Q queries.
    """
    if topk_ids.dim() != 2 or topk_ids.shape[1] < cutoffs.largest:
        raise ValueError(
            f"topk_ids must be [Q, K] with K >= {cutoffs.largest}, got {tuple(topk_ids.shape)}"
        )
    relevant, num_relevant = relevance_matrix(topk_ids, targets)
    evaluated = num_relevant > 0
    relevant, counts = relevant.double(), num_relevant.double().clamp_min(1.0)
    metrics: dict[str, QueryValues] = {}
    for k in cutoffs.hit_rate:
        metrics[f"hr@{k}"] = QueryValues(relevant[:, :k].amax(dim=1), evaluated)
    for k in cutoffs.recall:
        metrics[f"recall@{k}"] = QueryValues(relevant[:, :k].sum(dim=1) / counts, evaluated)
    for k in cutoffs.ndcg:
        metrics[f"ndcg@{k}"] = QueryValues(ndcg_at_k(relevant, counts, k), evaluated)
    metrics[f"mrr@{topk_ids.shape[1]}"] = QueryValues(reciprocal_rank(relevant), evaluated)
    for subset, items, ks in (
        ("tail", tail, cutoffs.tail_recall_cutoffs),
        ("cold", cold, cutoffs.cold_recall_cutoffs),
    ):
        if items is not None:
            metrics |= subset_recall(subset, topk_ids, only_in(targets, items), evaluated, ks)
    return metrics


def retrieval_metrics(
    topk_ids: torch.Tensor,
    targets: torch.Tensor | ItemLists,
    num_items: int,
    cutoffs: MetricCutoffs = MetricCutoffs(),
    tail: torch.Tensor | None = None,
    cold: torch.Tensor | None = None,
) -> dict[str, float]:
    """HR@k, Recall@k, NDCG@k, MRR@K, catalog coverage@k and (given ``tail``, ``cold``) tail and
    cold Recall@k.

    Args:
        topk_ids: [Q, K] int64 ranked item ids per query, distinct within a row; -1 = no item.
        targets: [Q] int64 one relevant item per query, or Q lists of relevant item ids.
        num_items: catalog size (coverage denominator).
        cutoffs: the K's to report; K must be >= cutoffs.largest.
        tail: [num_items] bool long-tail mask (``tail_items``), or None for no tail metrics.
        cold: [num_items] bool cold-item mask (``cold_items``), or None for no cold metrics.
    Returns:
        {"hr@10", "recall@10", "recall@50", "recall@100", "ndcg@10", "ndcg@50", "mrr@100",
        "coverage@10"} for the default cutoffs and K = 100, as Python floats (MRR is named for
        the K of ``topk_ids``); with ``tail`` also "tail_recall@10", "tail_recall@50",
        "tail_recall@100" (means over the queries with a tail relevant item, NaN if none),
        "tail_queries" (the fraction of evaluated queries that have one) and "tail_rows" (their
        number); with ``cold`` the same as "cold_...".
    """
    for subset, items in (("tail", tail), ("cold", cold)):
        if items is not None and tuple(items.shape) != (num_items,):
            raise ValueError(
                f"{subset} must be [{num_items}] (one flag per item), got {tuple(items.shape)}"
            )
    per_query = per_query_metrics(topk_ids, targets, cutoffs, tail, cold)
    metrics: dict[str, float] = {name: values.mean() for name, values in per_query.items()}
    for k in cutoffs.coverage:
        metrics[f"coverage@{k}"] = catalog_coverage(topk_ids[:, :k], num_items)
    for subset in ("tail", "cold"):
        if f"{subset}_queries" in per_query:
            metrics[f"{subset}_rows"] = row_count(per_query, subset)
    return metrics


def row_count(per_query: dict[str, QueryValues], subset: str) -> int:
    """How many queries have a relevant item of ``subset`` (the queries its recall is over)."""
    queries = per_query[f"{subset}_queries"]
    return int((queries.values * queries.included).sum())


def subset_recall(
    subset: str,
    topk_ids: torch.Tensor,
    subset_targets: torch.Tensor | ItemLists,
    evaluated: torch.Tensor,
    ks: tuple[int, ...],
) -> dict[str, QueryValues]:
    """Recall@k counting only the relevant items of an item subset (``only_in``).

    Args:
        subset: the metric prefix ("tail", "cold").
        topk_ids: [Q, K] int64 ranked ids.
        subset_targets: [Q] or Q lists: the relevant items inside the subset.
        evaluated: [Q] bool, the queries with any relevant item.
    Returns:
        "<subset>_recall@k" per k (over the queries that have a relevant subset item; its mean
        is NaN without one) and "<subset>_queries" (1.0 where the query has one, over the
        evaluated queries: its mean is the fraction).
    """
    relevant, num_relevant = relevance_matrix(topk_ids, subset_targets)
    has_subset = num_relevant > 0
    metrics = {f"{subset}_queries": QueryValues(has_subset.double(), evaluated)}
    relevant, counts = relevant.double(), num_relevant.double().clamp_min(1.0)
    for k in ks:
        metrics[f"{subset}_recall@{k}"] = QueryValues(
            relevant[:, :k].sum(dim=1) / counts, has_subset
        )
    return metrics


@overload
def only_in(targets: torch.Tensor, items: torch.Tensor) -> torch.Tensor: ...
@overload
def only_in(targets: ItemLists, items: torch.Tensor) -> ItemLists: ...
def only_in(targets: torch.Tensor | ItemLists, items: torch.Tensor) -> torch.Tensor | ItemLists:
    """The relevant items inside an item subset; the others (and -1) become "no target".

    Args:
        targets: [Q] int64 single targets (-1 = none), or Q lists of relevant ids.
        items: [N] bool subset mask (``tail_items``, ``cold_items``).
    Returns:
        [Q] int64 with targets outside the subset set to -1, or Q lists holding only their ids
        inside it.
    """
    items = items.to(torch.bool)
    if isinstance(targets, torch.Tensor):
        keep = (targets >= 0) & items[targets.clamp_min(0)]
        return torch.where(keep, targets, -1)
    keep = (targets.ids >= 0) & items[targets.ids.clamp_min(0)]
    kept_per_list = torch.bincount(targets.rows()[keep], minlength=targets.num_lists)
    offsets = torch.zeros_like(targets.offsets)
    torch.cumsum(kept_per_list, 0, out=offsets[1:])
    return ItemLists(offsets, targets.ids[keep])


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
