"""Retrieval metrics against hand-computed values; the popularity baseline against exact MIPS;
the long-tail mask and tail recall by hand and against simple reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.evaluation.metrics import (
    MetricCutoffs,
    cold_items,
    popularity_topk,
    retrieval_metrics,
    tail_items,
)
from trainer.mips import ItemLists, exact_topk

SMALL = MetricCutoffs(hit_rate=(2,), recall=(2, 4), ndcg=(2, 4), coverage=(2,))


def _log2_discount(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def test_single_target_metrics_by_hand() -> None:
    topk = torch.tensor([[3, 1, 4, 0], [2, 0, 5, 6]])
    metrics = retrieval_metrics(topk, torch.tensor([1, 6]), num_items=10, cutoffs=SMALL)
    expected = {
        "hr@2": 0.5,
        "recall@2": 0.5,
        "recall@4": 1.0,
        "ndcg@2": _log2_discount(2) / 2,
        "ndcg@4": (_log2_discount(2) + _log2_discount(4)) / 2,
        "mrr@4": (1 / 2 + 1 / 4) / 2,
        "coverage@2": 4 / 10,
    }
    assert metrics == pytest.approx(expected)


def test_list_targets_metrics_by_hand() -> None:
    topk = torch.tensor([[3, 1, 4, 0], [7, 8, 9, 2], [5, -1, -1, -1]])
    # Query 1 has no relevant item (not averaged); query 2 lists item 5 twice (counted once).
    targets = ItemLists.from_lists([[1, 0, 9], [], [5, 5]])
    metrics = retrieval_metrics(topk, targets, num_items=10, cutoffs=SMALL)
    d = _log2_discount
    ndcg2_q0 = d(2) / (d(1) + d(2))
    ndcg4_q0 = (d(2) + d(4)) / (d(1) + d(2) + d(3))
    expected = {
        "hr@2": 1.0,
        "recall@2": (1 / 3 + 1) / 2,
        "recall@4": (2 / 3 + 1) / 2,
        "ndcg@2": (ndcg2_q0 + 1) / 2,
        "ndcg@4": (ndcg4_q0 + 1) / 2,
        "mrr@4": (1 / 2 + 1) / 2,
        "coverage@2": 5 / 10,
    }
    assert metrics == pytest.approx(expected)


def test_default_cutoffs_and_short_lists_rejected() -> None:
    topk = torch.arange(100).repeat(3, 1)
    metrics = retrieval_metrics(topk, torch.tensor([0, 49, 500]), num_items=1000)
    assert set(metrics) == {
        "hr@10",
        "recall@10",
        "recall@50",
        "recall@100",
        "ndcg@10",
        "ndcg@50",
        "mrr@100",
        "coverage@10",
    }
    assert metrics["hr@10"] == pytest.approx(1 / 3)
    assert metrics["recall@50"] == pytest.approx(2 / 3)
    assert metrics["mrr@100"] == pytest.approx((1 + 1 / 50) / 3)
    assert metrics["coverage@10"] == pytest.approx(10 / 1000)
    with pytest.raises(ValueError, match="K >= 100"):
        retrieval_metrics(topk[:, :50], torch.tensor([0, 1, 2]), num_items=1000)


def test_popularity_topk_by_hand() -> None:
    counts = torch.tensor([5, 9, 5, 1, 9])
    exclude = ItemLists.from_lists([[4], [], [1, 0, 2]])
    scores, ids = popularity_topk(counts, 3, 4, exclude=exclude)
    assert ids.tolist() == [[1, 0, 2, 3], [1, 4, 0, 2], [4, 3, -1, -1]]
    assert scores[2].tolist() == [9.0, 1.0, -math.inf, -math.inf]
    _, no_exclusion = popularity_topk(counts, 2, 7)
    assert no_exclusion.tolist() == [[1, 4, 0, 2, 3, -1, -1]] * 2


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_items=st.integers(1, 60),
    num_queries=st.integers(1, 6),
    k=st.integers(1, 20),
)
def test_popularity_topk_equals_exact_topk_on_counts(seed, num_items, num_queries, k) -> None:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (num_items,), generator=generator)
    lists = [
        torch.randint(0, num_items, (int(n),), generator=generator).tolist()
        for n in torch.randint(0, 6, (num_queries,), generator=generator)
    ]
    exclude = ItemLists.from_lists(lists)
    scores, ids = popularity_topk(counts, num_queries, k, exclude=exclude)
    ones = torch.ones(num_queries, 1)
    expected_scores, expected_ids = exact_topk(
        ones, counts.float().unsqueeze(1), k, exclude=exclude
    )
    assert torch.equal(ids, expected_ids)
    assert torch.equal(scores, expected_scores)


# 8 items; 6 with a count > 0. Ordered by (count desc, id asc): 0, 2, 3, 5, 7, 4.
COUNTS = np.array([5, 0, 3, 3, 1, 3, 0, 2], dtype=np.float32)
TAIL_SMALL = MetricCutoffs(hit_rate=(2,), recall=(2,), ndcg=(2,), coverage=(2,), tail_recall=(2, 4))


def test_tail_items_by_hand() -> None:
    # Head = ceil(0.5 * 6) = 3 items: 0, 2, 3; item 5 ties with 2 and 3 but has the higher id.
    assert np.flatnonzero(tail_items(COUNTS, 0.5)).tolist() == [1, 4, 5, 6, 7]
    # ceil(0.2 * 6) = 2: items 0 and 2 (2 beats 3 and 5 on id).
    assert np.flatnonzero(~tail_items(COUNTS, 0.2)).tolist() == [0, 2]
    # Zero-count items stay tail even when the whole interacted set is head.
    assert np.flatnonzero(tail_items(COUNTS, 1.0)).tolist() == [1, 6]
    assert tail_items(COUNTS, 0.0).all()
    assert tail_items(np.zeros(4), 0.2).all()
    # 0.2 * 15 is 3.0000000000000004 in floats: still a head of 3.
    assert (~tail_items(np.arange(15, 0, -1), 0.2)).sum() == 3
    with pytest.raises(ValueError, match="head_fraction"):
        tail_items(COUNTS, 1.5)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 4), max_size=40), head_fraction=st.floats(0.0, 1.0))
def test_tail_items_equals_sorted_reference(counts: list[int], head_fraction: float) -> None:
    interacted = sum(c > 0 for c in counts)
    head_size = math.ceil(round(head_fraction * interacted, 9))
    head = sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:head_size]
    expected = [i not in head for i in range(len(counts))]
    assert tail_items(np.array(counts, dtype=np.int64), head_fraction).tolist() == expected


def test_tail_recall_single_targets_by_hand() -> None:
    tail = torch.from_numpy(tail_items(COUNTS, 0.5))  # tail = {1, 4, 5, 6, 7}
    topk = torch.tensor([[0, 5, 2, 3], [5, 0, 2, 7], [0, 2, 3, 5], [2, 3, 0, 5]])
    # Targets 5 (tail, hit at 2), 7 (tail, hit at 4), 2 (head: not a tail query), 1 (tail, count 0,
    # missed).
    metrics = retrieval_metrics(topk, torch.tensor([5, 7, 2, 1]), 8, TAIL_SMALL, tail)
    assert metrics["tail_queries"] == pytest.approx(3 / 4)
    assert metrics["tail_recall@2"] == pytest.approx(1 / 3)
    assert metrics["tail_recall@4"] == pytest.approx(2 / 3)
    assert metrics["recall@2"] == pytest.approx(2 / 4)  # the other metrics are unchanged
    head_only = retrieval_metrics(topk[2:3], torch.tensor([2]), 8, TAIL_SMALL, tail)
    assert head_only["tail_queries"] == 0.0
    assert math.isnan(head_only["tail_recall@2"])
    assert "tail_recall@2" not in retrieval_metrics(topk, torch.tensor([5, 7, 2, 1]), 8, TAIL_SMALL)
    with pytest.raises(ValueError, match="tail must be"):
        retrieval_metrics(topk, torch.tensor([5, 7, 2, 1]), 8, TAIL_SMALL, tail[:7])


def test_tail_recall_list_targets_by_hand() -> None:
    tail = torch.from_numpy(tail_items(COUNTS, 0.5))  # tail = {1, 4, 5, 6, 7}
    topk = torch.tensor([[0, 5, 2, 3], [5, 0, 2, 7], [5, 0, 2, 7]])
    # Only tail relevant items count: query 0 keeps {5}, query 1 none, query 2 {1, 7} (7 once).
    targets = ItemLists.from_lists([[5, 0], [2], [1, 7, 7]])
    metrics = retrieval_metrics(topk, targets, 8, TAIL_SMALL, tail)
    assert metrics["tail_queries"] == pytest.approx(2 / 3)
    assert metrics["tail_recall@2"] == pytest.approx((1 + 0) / 2)
    assert metrics["tail_recall@4"] == pytest.approx((1 + 1 / 2) / 2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_queries=st.integers(1, 12))
def test_tail_recall_equals_loop_reference(seed: int, num_queries: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_items, k = 20, 6
    counts = torch.randint(0, 4, (num_items,), generator=generator).numpy()
    tail = torch.from_numpy(tail_items(counts, 0.2))
    topk = torch.stack(
        [torch.randperm(num_items, generator=generator)[:k] for _ in range(num_queries)]
    )
    targets = torch.randint(0, num_items, (num_queries,), generator=generator)
    cutoffs = MetricCutoffs(
        hit_rate=(k,), recall=(k,), ndcg=(k,), coverage=(k,), tail_recall=(3, k)
    )
    metrics = retrieval_metrics(topk, targets, num_items, cutoffs, tail)
    tail_queries = [q for q in range(num_queries) if tail[targets[q]]]
    assert metrics["tail_queries"] == pytest.approx(len(tail_queries) / num_queries)
    for cutoff in (3, k):
        hits = [int(targets[q]) in topk[q, :cutoff].tolist() for q in tail_queries]
        expected = sum(hits) / len(hits) if hits else math.nan
        assert metrics[f"tail_recall@{cutoff}"] == pytest.approx(expected, nan_ok=True)


COLD_SMALL = MetricCutoffs(hit_rate=(2,), recall=(2,), ndcg=(2,), coverage=(2,), cold_recall=(2, 4))


def test_cold_items_by_hand() -> None:
    # Fewer than 3 events: the never-seen items 1 and 6, item 4 (1) and item 7 (2).
    assert np.flatnonzero(cold_items(COUNTS, 3)).tolist() == [1, 4, 6, 7]
    assert np.flatnonzero(cold_items(COUNTS, 1)).tolist() == [1, 6]
    assert cold_items(COUNTS, 6).all()
    with pytest.raises(ValueError, match="max_events"):
        cold_items(COUNTS, 0)


def test_cold_recall_single_targets_by_hand() -> None:
    cold = torch.from_numpy(cold_items(COUNTS, 3))  # cold = {1, 4, 6, 7}
    topk = torch.tensor([[4, 5, 2, 3], [5, 0, 2, 7], [0, 2, 3, 5], [2, 3, 0, 5], [1, 0, 2, 3]])
    # Targets 4 (cold, hit at 1), 7 (cold, hit at 4), 2 (3 events: warm), 6 (cold, never seen,
    # missed), 1 (cold, hit at 1): 4 cold queries of 5, hits@2 = 2, hits@4 = 3.
    targets = torch.tensor([4, 7, 2, 6, 1])
    metrics = retrieval_metrics(topk, targets, 8, COLD_SMALL, cold=cold)
    assert metrics["cold_rows"] == 4
    assert metrics["cold_queries"] == pytest.approx(4 / 5)
    assert metrics["cold_recall@2"] == pytest.approx(2 / 4)
    assert metrics["cold_recall@4"] == pytest.approx(3 / 4)
    assert metrics["recall@2"] == pytest.approx(3 / 5)  # the other metrics are unchanged
    assert not any(key.startswith("tail") for key in metrics)
    # No cold target: NaN recall over 0 rows, never a silent 0.
    warm_only = retrieval_metrics(topk[2:3], torch.tensor([2]), 8, COLD_SMALL, cold=cold)
    assert warm_only["cold_rows"] == 0 and warm_only["cold_queries"] == 0.0
    assert math.isnan(warm_only["cold_recall@2"]) and math.isnan(warm_only["cold_recall@4"])
    assert "cold_recall@2" not in retrieval_metrics(topk, targets, 8, COLD_SMALL)
    with pytest.raises(ValueError, match="cold must be"):
        retrieval_metrics(topk, targets, 8, COLD_SMALL, cold=cold[:7])


def test_cold_and_tail_recall_are_independent_subsets() -> None:
    tail = torch.from_numpy(tail_items(COUNTS, 0.5))  # tail = {1, 4, 5, 6, 7}
    cold = torch.from_numpy(cold_items(COUNTS, 3))  # cold = {1, 4, 6, 7}
    topk = torch.tensor([[0, 5, 2, 3], [5, 0, 2, 7]])
    # Target 5 is tail but not cold (3 events); 7 is both and hit at 4 only.
    cutoffs = MetricCutoffs(
        hit_rate=(2,), recall=(2,), ndcg=(2,), coverage=(2,), tail_recall=(2,), cold_recall=(4,)
    )
    metrics = retrieval_metrics(topk, torch.tensor([5, 7]), 8, cutoffs, tail, cold)
    assert metrics["tail_rows"] == 2 and metrics["tail_recall@2"] == pytest.approx(1 / 2)
    assert metrics["cold_rows"] == 1 and metrics["cold_recall@4"] == pytest.approx(1.0)
    assert "cold_recall@2" not in metrics and "tail_recall@4" not in metrics


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_queries=st.integers(1, 12), max_events=st.integers(1, 4))
def test_cold_recall_equals_loop_reference(seed: int, num_queries: int, max_events: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_items, k = 20, 6
    counts = torch.randint(0, 5, (num_items,), generator=generator).numpy()
    topk = torch.stack(
        [torch.randperm(num_items, generator=generator)[:k] for _ in range(num_queries)]
    )
    targets = torch.randint(0, num_items, (num_queries,), generator=generator)
    cutoffs = MetricCutoffs(
        hit_rate=(k,), recall=(k,), ndcg=(k,), coverage=(k,), cold_recall=(3, k)
    )
    cold = torch.from_numpy(cold_items(counts, max_events))
    metrics = retrieval_metrics(topk, targets, num_items, cutoffs, cold=cold)
    cold_queries = [q for q in range(num_queries) if counts[targets[q]] < max_events]
    assert metrics["cold_rows"] == len(cold_queries)
    for cutoff in (3, k):
        hits = [int(targets[q]) in topk[q, :cutoff].tolist() for q in cold_queries]
        expected = sum(hits) / len(hits) if hits else math.nan
        assert metrics[f"cold_recall@{cutoff}"] == pytest.approx(expected, nan_ok=True)
