"""Evaluation's pure pieces: seen-item exclusion and popularity counts; metrics reduced over 2
ranks (tail and cold recall included) equal the metrics of all queries in one process."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.dist_helpers import run_distributed
from trainer.evaluate import _score_ranking, cutoffs_for, popularity_scores, seen_items
from trainer.metrics import cold_items, retrieval_metrics, tail_items

KS = (10, 20)
NUM_ITEMS = 40


def _pairs(users: list[int], items: list[int]) -> pa.Table:
    return pa.table({"user_id": np.array(users), "item_id": np.array(items)})


def test_seen_items_excludes_history_but_not_the_target() -> None:
    pairs = _pairs([0, 0, 1, 0, 2, 1], [5, 3, 5, 5, 9, 7])
    offsets, ids = seen_items(pairs, np.array([1, 0, 3]), np.array([7, 8, 1]))
    lists = [ids[offsets[q] : offsets[q + 1]].tolist() for q in range(3)]
    # user 1 saw 5 and 7 (7 is its target); user 0 saw 3 and 5 (deduplicated); user 3 nothing.
    assert lists == [[5], [3, 5], []]


def test_popularity_counts_training_events() -> None:
    scores = popularity_scores(_pairs([0, 1, 2, 3], [2, 2, 0, 2]), num_items=4)
    assert scores.tolist() == [1.0, 0.0, 3.0, 0.0]


def _ranking_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk [12, 20], targets [12] (tail targets in the first 5 rows only), tail [40] bool, cold
    [40] bool (items with fewer than 3 counted events; for seed 7 the targets of rows 2-4)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (NUM_ITEMS,), generator=generator).numpy()
    tail = torch.from_numpy(tail_items(counts, 0.2))
    cold = torch.from_numpy(cold_items(counts, 3))
    topk = torch.stack([torch.randperm(NUM_ITEMS, generator=generator)[:20] for _ in range(12)])
    head_ids, tail_ids = torch.nonzero(~tail).flatten(), torch.nonzero(tail).flatten()
    targets = torch.cat([tail_ids[:5], head_ids[torch.arange(7) % len(head_ids)]])
    # Put some targets inside the retrieved lists so every metric is non-trivial.
    topk[::2, 3] = targets[::2]
    # ... and take one out: row 3 (cold for seed 7) misses, so cold recall is below 1.
    topk[3] = torch.where(topk[3] == targets[3], -1, topk[3])
    topk = torch.stack([_dedupe(row) for row in topk])
    return topk, targets, tail, cold


def _dedupe(row: torch.Tensor) -> torch.Tensor:
    seen: list[int] = []
    for item in row.tolist():
        seen.append(item if item not in seen else -1)
    return torch.tensor(seen)


def _score_rank_shares(
    rank: int, world_size: int, seed: int, splits: tuple[int, ...]
) -> list[dict[str, float]]:
    """Rank 0 scores rows [0, split), rank 1 rows [split, 12), for each split; then split 3 once
    more with no cold item at all."""
    topk, targets, tail, cold = _ranking_case(seed)
    cpu = torch.device("cpu")
    results = []
    for split in (*splits, 3):
        if len(results) == len(splits):
            cold = torch.zeros_like(cold)
        rows = slice(0, split) if rank == 0 else slice(split, None)
        results.append(_score_ranking(topk[rows], targets[rows], KS, NUM_ITEMS, tail, cold, cpu))
    return results


def test_two_rank_metrics_equal_one_process() -> None:
    # Rows 0-4 are the tail queries, rows 2-4 the cold ones (row 3 a miss). Split 3: both ranks
    # have some, in unequal numbers (a mean of rank means would differ); 5: rank 1 has none; 9:
    # rank 1 has head rows only; 12: no rows.
    splits = (3, 5, 9, 12)
    per_rank = run_distributed(_score_rank_shares, 2, 7, splits)
    topk, targets, tail, cold = _ranking_case(7)
    expected = retrieval_metrics(topk, targets, NUM_ITEMS, cutoffs_for(KS), tail, cold)
    assert expected["tail_queries"] == pytest.approx(5 / 12)
    assert 0 < expected["tail_recall@10"] < 1
    assert expected["cold_rows"] == 3 and expected["tail_rows"] == 5
    assert expected["cold_recall@10"] == expected["cold_recall@20"] == pytest.approx(2 / 3)
    # Split 3's mean of rank means: rank 0 has row 2 (a hit), rank 1 rows 3-4 (one hit of two).
    assert (1 + 1 / 2) / 2 != pytest.approx(expected["cold_recall@10"])
    for results in per_rank:
        for split, result in zip(splits, results[:-1], strict=True):
            assert result == pytest.approx(expected), split
            assert not any(math.isnan(v) for v in result.values())
        no_cold = results[-1]
        assert no_cold["cold_rows"] == 0 and no_cold["cold_queries"] == 0.0
        assert all(math.isnan(no_cold[f"cold_recall@{k}"]) for k in KS)
        rest = {k: v for k, v in no_cold.items() if not k.startswith("cold")}
        assert rest == pytest.approx(
            {k: v for k, v in expected.items() if not k.startswith("cold")}
        )
