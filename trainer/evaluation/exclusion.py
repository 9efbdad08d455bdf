"""Which items an evaluation query may not be recommended: the ``eval.exclude`` rule.

The rule depends on the query's user and the events before the evaluated split, never on the
query's target: when the rule removes the target, the query counts as a miss. Exempting the
target (removing every other item the user was shown) would leak it on a logged feed, where the
target was usually shown before: its shown competitors vanish while it stays.

- ``engaged``: items of the user's earlier events with positive net user value
  (``labels . loss.label_weights > 0``): what the user already consumed.
- ``all_shown``: every item of the user's earlier events (impressions included).
- ``none``: nothing; the right protocol where repeat consumption is the use case.

"Earlier events" of a query are those of the splits before the evaluated one (train, plus
valid for test) and the evaluated split's own events of the user strictly before the query's
time: under a global temporal split, or on a feed with several test clicks per user, a user's
earlier held-out events are as much in the past as their training events.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from config import ExcludeRule
from data_pipeline.schema import ITEM_ID, TIMESTAMP, USER_ID, label_column
from trainer.mips import ItemLists

# Splits besides train whose events come before a split's events (test follows valid).
EARLIER_SPLITS = {"test": ("valid",)}


def earlier_splits(split: str, train_split: str) -> tuple[str, ...]:
    """The splits whose events precede ``split``'s (none for the training split itself)."""
    if split == train_split:
        return ()
    return (train_split, *EARLIER_SPLITS.get(split, ()))


def columns_for(rule: ExcludeRule, labels: Sequence[str]) -> list[str]:
    """The event columns :func:`excluded_pairs` reads under ``rule``."""
    if rule is ExcludeRule.ENGAGED:
        return [USER_ID, ITEM_ID, TIMESTAMP, *(label_column(x) for x in labels)]
    return [USER_ID, ITEM_ID, TIMESTAMP]


def net_user_value(events: pa.Table, label_weights: dict[str, float]) -> np.ndarray:
    """[N] float64 ``labels . label_weights`` of each event (labels absent from the weights
    count 0)."""
    value = np.zeros(events.num_rows, np.float64)
    for label, weight in label_weights.items():
        if weight:
            value += weight * events.column(label_column(label)).to_numpy().astype(np.float64)
    return value


def excluded_pairs(
    events: pa.Table, rule: ExcludeRule, label_weights: dict[str, float]
) -> pa.Table:
    """(user_id, item_id, timestamp) of the ``events`` the rule excludes from later queries."""
    pairs = events.select([USER_ID, ITEM_ID, TIMESTAMP])
    if rule is ExcludeRule.NONE:
        return pairs.slice(0, 0)
    if rule is ExcludeRule.ENGAGED:
        engaged = net_user_value(events, label_weights) > 0
        return pairs.filter(pa.array(engaged))
    return pairs


def user_item_lists(
    earlier: pa.Table,
    user_ids: np.ndarray,
    same_split: pa.Table | None = None,
    times: np.ndarray | None = None,
) -> ItemLists:
    """Per query, the distinct items of its user's excluded events before it, whatever the
    query's target: every pair of ``earlier`` (the earlier splits), and the pairs of
    ``same_split`` (the evaluated split) with a timestamp strictly below the query's.

    Args:
        earlier, same_split: (user_id, item_id, timestamp) tables (:func:`excluded_pairs`).
        user_ids: [Q] int64 each query's user.
        times: [Q] int64 each query's event time (needed with ``same_split``).
    Returns:
        Q lists (CSR offsets [Q + 1], ids [nnz]), ids sorted within a list.
    """
    users = [earlier.column(USER_ID).to_numpy().astype(np.int64)]
    items = [earlier.column(ITEM_ID).to_numpy().astype(np.int64)]
    # Order key (time + 1), 0 for the earlier splits: "before the query" is key < query time + 1.
    keys = [np.zeros(earlier.num_rows, np.int64)]
    if same_split is not None:
        users.append(same_split.column(USER_ID).to_numpy().astype(np.int64))
        items.append(same_split.column(ITEM_ID).to_numpy().astype(np.int64))
        keys.append(same_split.column(TIMESTAMP).to_numpy().astype(np.int64) + 1)
    user, item, key = (np.concatenate(x) for x in (users, items, keys))
    order = np.lexsort((key, user))
    user, item, key = user[order], item[order], key[order]
    if times is None:
        query_keys = np.full(len(user_ids), np.iinfo(np.int64).max)
    else:
        query_keys = times.astype(np.int64) + 1
    starts = np.searchsorted(user, user_ids, side="left")
    stops = np.searchsorted(user, user_ids, side="right")
    # Within a user's rows keys ascend: the rows before the query end where key >= query key.
    ends = [
        a + np.searchsorted(key[a:b], k, side="left")
        for a, b, k in zip(starts, stops, query_keys, strict=True)
    ]
    chunks = [np.unique(item[a:e]) for a, e in zip(starts, ends, strict=True)]
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    ids = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)
    return ItemLists(torch.from_numpy(offsets), torch.from_numpy(ids))


def engaged_counts(events: pa.Table, num_items: int, label_weights: dict[str, float]) -> np.ndarray:
    """[N] float32 per item, the training events with positive net user value: the
    most-popular baseline's scores (what users chose, not what the feed showed them)."""
    engaged = pc.filter(events.column(ITEM_ID), pa.array(net_user_value(events, label_weights) > 0))
    return np.bincount(engaged.to_numpy(), minlength=num_items).astype(np.float32)
