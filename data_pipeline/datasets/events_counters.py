"""Point-in-time item popularity counters of a user's own log, partition by partition.

Kinds: ``event`` (every event) and one per label (label > 0); windows 1, 7 and 30 days: the
``counter`` features ``item_<kind>_count_<window>``, each with its own bucket table. The rules
are MovieLens's (:mod:`data_pipeline.datasets.movielens_counters`):

* event rows, every split: the same item's events with ``t - w <= s < t`` over the whole log;
* ``items/`` snapshot: train-split events only, at ``max(train timestamp) + 1`` (leave-last-out)
  or at ``T1`` (temporal);
* ``manifest.counters``: mean and std of ``log1p(count)`` over the train rows.

An item's events are spread over the user partitions, so two more spills run:
(a) every event with its split, by item; (b) per item partition, the counts of its events, the
partition's share of the snapshot and the train statistics, spilled back by user so the
assembly of a user partition reads its events' counts aligned by log order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.counters import CounterStatistics, counter_name, point_in_time_counts
from data_pipeline.datasets.event_features import counter_snapshot, counter_spec, counter_tables
from data_pipeline.datasets.events_spill import ITEM, ORDER, TIME, USER, PartitionSpill
from data_pipeline.datasets.movielens_counters import (
    COUNTER_WINDOWS,
    LAST_TRAIN_SNAPSHOT_RULE,
    VALID_START_SNAPSHOT_RULE,
)
from data_pipeline.datasets.split import TRAIN
from data_pipeline.schema import FeatureSpec

EVENT_KIND = "event"
_TRAIN = "train"


def counter_kinds(labels: tuple[str, ...]) -> tuple[str, ...]:
    return (EVENT_KIND, *labels)


def counter_names(labels: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(counter_name(k, w) for k in counter_kinds(labels) for w in COUNTER_WINDOWS)


@dataclass
class EventCounters:
    """Counters of every event (spilled by user) and the items' snapshot.

    Args:
        names: the counter features.
        spill: by user: ``order`` and one int32 count column per counter.
        snapshot: counter name -> [I] int64 counts by dense item id.
        snapshot_time: when the snapshot was taken.
        statistics: ``manifest.counters``.
        snapshot_rule: how ``snapshot_time`` was chosen.
    """

    names: tuple[str, ...]
    spill: PartitionSpill
    snapshot: dict[str, np.ndarray]
    snapshot_time: int
    statistics: dict[str, dict[str, Any]]
    snapshot_rule: str

    def per_event(self, partition: int, orders: np.ndarray) -> dict[str, np.ndarray]:
        """[R] int64 counts per counter for user partition ``partition``'s events, whose
        log positions are ``orders`` [R] (ascending)."""
        rows = self.spill.read(partition)
        if not np.array_equal(rows[ORDER], orders):
            raise RuntimeError(f"counter spill {self.spill.path(partition)} lost its events")
        return {name: rows[name].astype(np.int64) for name in self.names}

    def specs(self) -> list[FeatureSpec]:
        return [counter_spec(name) for name in self.names]

    def tables(self) -> dict[str, int]:
        return counter_tables(self.names)

    def to_manifest(self, labels: tuple[str, ...]) -> dict[str, Any]:
        return {
            "kinds": {EVENT_KIND: "every event", **{label: f"{label} > 0" for label in labels}},
            "windows": dict(COUNTER_WINDOWS),
            "event_rows": "events of the same item with t - w <= s < t, over all splits",
            "snapshot_time": self.snapshot_time,
            "snapshot_rule": self.snapshot_rule,
            "statistics": "manifest.counters: log1p(count) over train event rows",
        }


def counts_spill(folder: Path, num_partitions: int, names: tuple[str, ...]) -> PartitionSpill:
    """The per-event counts, spilled by user (``order``, ``user``, one int32 per counter)."""
    fields = {ORDER: pa.int64(), USER: pa.int64(), **dict.fromkeys(names, pa.int32())}
    return PartitionSpill(folder / "counts", num_partitions, fields, key=USER)


def event_counters(
    partitions: Callable[[], Iterator[tuple[dict[str, np.ndarray], np.ndarray]]],
    num_partitions: int,
    folder: Path,
    labels: tuple[str, ...],
    num_items: int,
    valid_start: int | None,
) -> EventCounters:
    """The counters (module docstring).

    Args:
        partitions: a fresh iterator of (user partition's events, [R] int8 split codes) per call,
            partition by partition.
        num_partitions: P of both spills.
        folder: where the spills go.
        labels: the log's labels.
        num_items: I.
        valid_start: the temporal split's T1 (the snapshot time), or None (leave-last-out).
    """
    kinds = counter_kinds(labels)
    names = counter_names(labels)
    by_item = PartitionSpill(
        folder / "by_item",
        num_partitions,
        {ITEM: pa.int64(), TIME: pa.int64(), ORDER: pa.int64(), USER: pa.int64(),
         _TRAIN: pa.int8(), **dict.fromkeys(labels, pa.float32())},
        key=ITEM,
    )  # fmt: skip
    last_train = None
    with by_item:
        for events, codes in partitions():
            train = (codes == TRAIN).astype(np.int8)
            by_item.write({**events, _TRAIN: train})
            if train.any():
                latest = int(events[TIME][train.astype(bool)].max())
                last_train = latest if last_train is None else max(last_train, latest)
    if valid_start is None:
        snapshot_time, rule = (
            (last_train + 1 if last_train is not None else 0),
            LAST_TRAIN_SNAPSHOT_RULE,
        )
    else:
        snapshot_time, rule = valid_start, VALID_START_SNAPSHOT_RULE
    by_user = counts_spill(folder, num_partitions, names)
    snapshot = {name: np.zeros(num_items, np.int64) for name in names}
    statistics = CounterStatistics()
    with by_user:
        for p in range(num_partitions):
            rows = by_item.read(p)
            flags = {EVENT_KIND: np.ones(rows[ITEM].shape[0], bool)}
            flags.update({label: rows[label] > 0 for label in labels})
            counts = point_in_time_counts(rows[ITEM], rows[TIME], flags, COUNTER_WINDOWS)
            train = rows[_TRAIN].astype(bool)
            statistics.update({name: counts[name][train] for name in names})
            share = counter_snapshot(
                rows[ITEM][train],
                rows[TIME][train],
                {kind: flags[kind][train] for kind in kinds},
                COUNTER_WINDOWS,
                at=snapshot_time,
                num_items=num_items,
            )
            for name in names:
                snapshot[name] += share[name]
            by_user.write(
                {ORDER: rows[ORDER], USER: rows[USER]}
                | {name: counts[name].astype(np.int32) for name in names}
            )
    return EventCounters(names, by_user, snapshot, snapshot_time, statistics.to_manifest(), rule)
