"""Evaluation's pure pieces: seen-item exclusion and popularity counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trainer.evaluate import popularity_scores, seen_items


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
