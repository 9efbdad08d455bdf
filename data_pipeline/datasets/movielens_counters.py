"""MovieLens point-in-time item popularity counters.

Kinds: ``rating`` (every rating) and ``like`` (rating >= 4); windows 1, 7 and 30 days. That is six
``counter`` features ``item_<kind>_count_<window>``
(:func:`~data_pipeline.counters.counter_name`), each with a bucket table of its own name.

* Event rows, every split: the count of the same item's ratings (likes) with
  ``t - w <= s < t`` over the whole log (:func:`~data_pipeline.counters.point_in_time_counts`):
  an event sees only strictly earlier events, never itself nor a same-second one, whatever split
  those fall in (a valid/test row may see another user's earlier train event and vice versa,
  exactly what a live system would have counted at that time).
* ``items/`` snapshot: each item's counters at ``snapshot_time``, counting train-split events
  only (:func:`~data_pipeline.datasets.event_features.counter_snapshot`), so no held-out event
  leaks into the corpus that evaluation scores. Leave-last-out: ``snapshot_time = max(train
  timestamp) + 1``. Temporal split: ``snapshot_time = T1``, the first valid second; train is then
  exactly the events before ``T1``, so the snapshot counts events with ``T1 - w <= s < T1``.
* ``manifest.counters``: mean and std of ``log1p(count)`` over the train split's event rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.counters import DAY, CounterStatistics, counter_name, point_in_time_counts
from data_pipeline.datasets.event_features import counter_snapshot, counter_spec, counter_tables
from data_pipeline.schema import FeatureSpec

COUNTER_KINDS = ("rating", "like")
COUNTER_WINDOWS: dict[str, int] = {"1d": DAY, "7d": 7 * DAY, "30d": 30 * DAY}
COUNTER_NAMES = tuple(counter_name(k, w) for k in COUNTER_KINDS for w in COUNTER_WINDOWS)
LAST_TRAIN_SNAPSHOT_RULE = (
    "items/: train-split events with snapshot_time - w <= s < snapshot_time, "
    "snapshot_time = max train timestamp + 1"
)
VALID_START_SNAPSHOT_RULE = (
    "items/: train-split events with snapshot_time - w <= s < snapshot_time, "
    "snapshot_time = T1 (split.valid_start_timestamp); train = every event before T1"
)


def counter_specs() -> list[FeatureSpec]:
    return [counter_spec(name) for name in COUNTER_NAMES]


def table_sizes() -> dict[str, int]:
    return counter_tables(COUNTER_NAMES)


@dataclass(frozen=True)
class ItemCounters:
    """Counters of every event and the items' snapshot.

    Args:
        per_event: counter name -> ``[N]`` int32 counts in log order (int32 halves the memory of
            ml-32m's 6 x 32M counts; a count never exceeds N < 2**31).
        snapshot: counter name -> ``[I]`` int64 counts indexed by dense item id.
        snapshot_time: the snapshot's time (max train timestamp + 1, or T1 when given).
        statistics: ``manifest.counters``, fitted on the train rows of ``per_event``.
        snapshot_rule: how ``snapshot_time`` was chosen, for the manifest.
    """

    per_event: dict[str, np.ndarray]
    snapshot: dict[str, np.ndarray]
    snapshot_time: int
    statistics: dict[str, dict[str, Any]]
    snapshot_rule: str = LAST_TRAIN_SNAPSHOT_RULE

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``[R]`` int64 counts of the log events ``rows``, per counter."""
        return {name: counts[rows].astype(np.int64) for name, counts in self.per_event.items()}

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kinds": {"rating": "every rating", "like": "rating >= 4"},
            "windows": dict(COUNTER_WINDOWS),
            "event_rows": "events of the same item with t - w <= s < t, over all splits",
            "snapshot_time": self.snapshot_time,
            "snapshot_rule": self.snapshot_rule,
            "statistics": "manifest.counters: log1p(count) over train event rows",
        }


def item_counters(
    item: np.ndarray,
    timestamp: np.ndarray,
    like: np.ndarray,
    train: np.ndarray,
    num_items: int,
    snapshot_time: int | None = None,
) -> ItemCounters:
    """Counters of a rating log.

    Args:
        item, timestamp: ``[N]`` int64 dense item ids and seconds of every event.
        like: ``[N]`` 1 where rating >= 4.
        train: ``[N]`` bool, events of the train split.
        num_items: I.
        snapshot_time: time of the ``items/`` snapshot, after every train event (the temporal
            split's T1); None: max train timestamp + 1.
    """
    flags = {"rating": np.ones(item.shape[0], dtype=bool), "like": like.astype(bool)}
    counts = point_in_time_counts(item, timestamp, flags, COUNTER_WINDOWS)
    per_event = {name: counts.pop(name).astype(np.int32) for name in COUNTER_NAMES}
    rule = LAST_TRAIN_SNAPSHOT_RULE if snapshot_time is None else VALID_START_SNAPSHOT_RULE
    if snapshot_time is None:
        snapshot_time = int(timestamp[train].max()) + 1 if train.any() else 0
    elif train.any() and int(timestamp[train].max()) >= snapshot_time:
        raise ValueError(f"snapshot_time {snapshot_time} is not after every train event")
    snapshot = counter_snapshot(
        item[train],
        timestamp[train],
        {kind: values[train] for kind, values in flags.items()},
        COUNTER_WINDOWS,
        at=snapshot_time,
        num_items=num_items,
    )
    statistics = CounterStatistics().update({n: c[train] for n, c in per_event.items()})
    return ItemCounters(
        per_event=per_event,
        snapshot={name: snapshot[name] for name in COUNTER_NAMES},
        snapshot_time=snapshot_time,
        statistics=statistics.to_manifest(),
        snapshot_rule=rule,
    )
