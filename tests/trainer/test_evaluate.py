"""Evaluation's pure pieces: the exclusion rule (never exempting the target) and popularity
counts; metrics reduced over 2 ranks (tail and cold recall included) equal the metrics of all
queries in one process."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from config import ExcludeRule
from tests.dist_helpers import run_distributed
from trainer.evaluation.evaluate import _score_ranking, cutoffs_for, popularity_scores
from trainer.evaluation.exclusion import engaged_counts, excluded_pairs, user_item_lists
from trainer.evaluation.intervals import BootstrapConfig
from trainer.evaluation.metrics import cold_items, popularity_topk, retrieval_metrics, tail_items
from trainer.mips import ItemLists
from trainer.runtime.distributed import DistributedEnv

KS = (10, 20)
NUM_ITEMS = 40


def _pairs(users: list[int], items: list[int]) -> pa.Table:
    return pa.table({"user_id": np.array(users), "item_id": np.array(items)})


def _feed(
    users: list[int], items: list[int], clicks: list[int], times: list[int] | None = None
) -> pa.Table:
    """Logged impressions: (user_id, item_id, timestamp, label_click, label_like = 0)."""
    return pa.table(
        {
            "user_id": np.array(users),
            "item_id": np.array(items),
            "timestamp": np.array(times if times is not None else range(len(users))),
            "label_click": np.array(clicks, np.float32),
            "label_like": np.zeros(len(users), np.float32),
        }
    )


def _lists(rule: ExcludeRule, feed: pa.Table, users: list[int]) -> list[list[int]]:
    lists = user_item_lists(excluded_pairs(feed, rule, {"click": 1.0}), np.array(users))
    return [lists.ids[lists.offsets[q] : lists.offsets[q + 1]].tolist() for q in range(len(users))]


def test_exclusion_rules_by_hand_and_independent_of_the_target() -> None:
    # User 0 was shown 5, 3, 5 (clicked 5 once) and 7 (not clicked); user 1 clicked 9.
    feed = _feed([0, 0, 0, 0, 1], [5, 3, 5, 7, 9], [0, 0, 1, 0, 1])
    # Two queries of user 0 (whatever their targets), one of user 1, one of a new user 2.
    users = [0, 0, 1, 2]
    assert _lists(ExcludeRule.ENGAGED, feed, users) == [[5], [5], [9], []]
    assert _lists(ExcludeRule.ALL_SHOWN, feed, users) == [[3, 5, 7], [3, 5, 7], [9], []]
    assert _lists(ExcludeRule.NONE, feed, users) == [[], [], [], []]


def test_the_evaluated_splits_own_earlier_events_are_excluded_at_the_query_time() -> None:
    earlier = excluded_pairs(_feed([0], [9], [1]), ExcludeRule.ENGAGED, {"click": 1.0})
    # The evaluated split: user 0 clicks 4 at t=10, 5 at t=20 and 6 at t=20 (same second).
    test = _feed([0, 0, 0], [4, 5, 6], [1, 1, 1], [10, 20, 20])
    own = excluded_pairs(test, ExcludeRule.ENGAGED, {"click": 1.0})
    lists = user_item_lists(earlier, np.array([0, 0, 0]), own, np.array([10, 20, 20]))
    got = [lists.ids[lists.offsets[q] : lists.offsets[q + 1]].tolist() for q in range(3)]
    # Strictly earlier only: the query at t=20 sees 4 but neither same-second click.
    assert got == [[9], [4, 9], [4, 9]]


def test_a_shown_target_is_not_exempted_from_exclusion() -> None:
    """A logged feed: every user was shown the two most popular items and the test target
    before (not clicked). Exempting the target while removing the other shown items, the old
    rule, hands most-popular a hit at rank 1 for every query; under each target-independent
    rule the shown target is either excluded (a miss) or competes with the popular items."""
    users = list(range(6))
    targets = torch.full((len(users),), 2)  # item 2, the third most popular
    shown_users = [u for u in users for _ in range(3)]
    shown_items = [x for _ in users for x in (0, 1, 2)]
    feed = _feed(shown_users, shown_items, [0] * len(shown_users))
    # Popularity by clicks elsewhere: items 0 and 1 are the head, then item 2.
    counts = torch.tensor([9.0, 8.0, 7.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.0])

    def hit_rate_at_1(lists: list[list[int]]) -> float:
        offsets = np.cumsum([0, *(len(x) for x in lists)])
        ids = torch.tensor([i for x in lists for i in x], dtype=torch.int64)
        exclude = ItemLists(torch.from_numpy(offsets), ids)
        _, top = popularity_topk(counts, len(users), 1, exclude)
        return float((top[:, 0] == targets).double().mean())

    old_rule = [
        [x for x in row if x != int(t)]
        for row, t in zip(_lists(ExcludeRule.ALL_SHOWN, feed, users), targets, strict=True)
    ]
    assert hit_rate_at_1(old_rule) == 1.0  # inflated: the target is the top item left
    assert hit_rate_at_1(_lists(ExcludeRule.ALL_SHOWN, feed, users)) == 0.0  # target excluded
    assert hit_rate_at_1(_lists(ExcludeRule.NONE, feed, users)) == 0.0  # head items win
    assert hit_rate_at_1(_lists(ExcludeRule.ENGAGED, feed, users)) == 0.0  # nothing engaged


def test_engaged_counts_count_positive_net_user_value() -> None:
    feed = _feed([0, 1, 2, 3], [2, 2, 0, 2], [1, 0, 1, 1])
    assert engaged_counts(feed, 4, {"click": 1.0}).tolist() == [1.0, 0.0, 2.0, 0.0]
    assert engaged_counts(feed, 4, {"like": 1.0}).tolist() == [0.0, 0.0, 0.0, 0.0]


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
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    no_intervals = BootstrapConfig(replicates=0)
    users = torch.arange(len(targets))
    results = []
    for split in (*splits, 3):
        if len(results) == len(splits):
            cold = torch.zeros_like(cold)
        rows = slice(0, split) if rank == 0 else slice(split, None)
        metrics, _ = _score_ranking(
            topk[rows], targets[rows], users[rows], KS, NUM_ITEMS, tail, cold, env, no_intervals
        )
        results.append(metrics)
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
