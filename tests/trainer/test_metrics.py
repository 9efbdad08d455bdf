"""Retrieval metrics against hand-computed values; the popularity baseline against exact MIPS."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.metrics import MetricCutoffs, popularity_topk, retrieval_metrics
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
        "mrr": (1 / 2 + 1 / 4) / 2,
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
        "mrr": (1 / 2 + 1) / 2,
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
        "mrr",
        "coverage@10",
    }
    assert metrics["hr@10"] == pytest.approx(1 / 3)
    assert metrics["recall@50"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 50) / 3)
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
