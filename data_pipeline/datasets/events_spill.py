"""Bounded-memory passes of ``twotower prepare events`` over a log too large to hold.

1. :class:`DistinctIds` collects the raw ids of a pass over the log; :class:`IdMap` turns them
   into dense ids (raw ids sorted as strings, dense id = position), so the maps depend only on the
   set of ids, not on file order.
2. :class:`PartitionSpill` writes every event, in dense ids, to one of P Parquet files by
   ``user mod P``: each file holds every event of its users, so per-user work (history, split,
   de-duplication) reads one partition at a time.
3. :func:`k_core` drops users and items with too few events, iterated to a fixed point, streaming
   the partitions once per iteration with O(U + I) state.
4. :class:`TimeCounts` merges per-partition (timestamp, count) pairs, from which
   :meth:`TimeCounts.thresholds` gives the temporal split's exact quantiles without sorting the
   whole log.

Memory: the id maps (O(U + I)), one input chunk, one partition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.datasets.events_mapping import DedupPolicy
from data_pipeline.datasets.split import TemporalThresholds, thresholds_at

USER, ITEM, TIME, ORDER = "user", "item", "timestamp", "order"
_MERGE_AT = 1 << 22


class DistinctIds:
    """The distinct strings of many chunks (merged whenever the pending ones grow large)."""

    def __init__(self) -> None:
        self._parts: list[pa.Array] = []
        self._pending = 0

    def add(self, values: pa.Array) -> None:
        unique = pc.unique(values)
        self._parts.append(unique)
        self._pending += len(unique)
        if self._pending > _MERGE_AT:
            self._parts = [self._merged()]
            self._pending = len(self._parts[0])

    def _merged(self) -> pa.Array:
        if not self._parts:
            return pa.array([], pa.string())
        return pc.unique(pa.concat_arrays([p.cast(pa.string()) for p in self._parts]))

    def id_map(self) -> IdMap:
        merged = self._merged()
        return IdMap(merged.take(pc.sort_indices(merged)))


@dataclass(frozen=True)
class IdMap:
    """Raw id (string) of every dense id.

    Args:
        raw: [n] sorted distinct raw ids; dense id = position.
    """

    raw: pa.Array

    def __len__(self) -> int:
        return len(self.raw)

    def dense(self, raw_ids: pa.Array) -> np.ndarray:
        """[R] raw ids -> [R] int64 dense ids; an id not in the map is -1."""
        index = pc.index_in(raw_ids, value_set=self.raw)
        return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def keep(self, alive: np.ndarray) -> tuple[IdMap, np.ndarray]:
        """The map of the ids with ``alive`` [n] True, and [n] int64 old -> new id (-1 dropped)."""
        new_ids = np.where(alive, np.cumsum(alive) - 1, -1).astype(np.int64)
        return IdMap(self.raw.filter(pa.array(alive))), new_ids


def partitions_for(events: int, partition_events: int) -> int:
    """P such that a partition holds about ``partition_events`` events (at least 1)."""
    return max(1, math.ceil(events / max(1, partition_events)))


class PartitionSpill:
    """Rows spilled to ``folder/part-PPPPP.parquet`` by ``key mod P``.

    Args:
        folder: where the partition files go.
        partitions: P.
        fields: the columns (name -> Arrow type) every written chunk has.
        key: the int64 column that picks the partition (``user``: every event of a user in one
            file).
    """

    def __init__(
        self, folder: Path, partitions: int, fields: dict[str, pa.DataType], key: str = USER
    ) -> None:
        self.folder = folder
        self.partitions = partitions
        self.key = key
        self.schema = pa.schema([pa.field(name, kind) for name, kind in fields.items()])
        folder.mkdir(parents=True, exist_ok=True)
        self._writers: list[pq.ParquetWriter] | None = None

    @classmethod
    def of_events(cls, folder: Path, partitions: int, labels: tuple[str, ...]) -> PartitionSpill:
        """The log's events by user: ``user``, ``item``, ``timestamp``, ``order`` (int64; order
        = position of the event in the whole log, file by file, row by row) and one float32
        column per label."""
        fields = {USER: pa.int64(), ITEM: pa.int64(), TIME: pa.int64(), ORDER: pa.int64()}
        return cls(folder, partitions, {**fields, **dict.fromkeys(labels, pa.float32())})

    def path(self, partition: int) -> Path:
        return self.folder / f"part-{partition:05d}.parquet"

    def __enter__(self) -> PartitionSpill:
        self._writers = [
            pq.ParquetWriter(self.path(p), self.schema) for p in range(self.partitions)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in self._writers or []:
            writer.close()
        self._writers = None

    def write(self, columns: dict[str, np.ndarray]) -> None:
        """One chunk: ``columns`` keyed like the schema, [R] each."""
        assert self._writers is not None, "write inside `with PartitionSpill(...)`"
        partition = columns[self.key] % self.partitions
        order = np.argsort(partition, kind="stable")
        bounds = np.searchsorted(partition[order], np.arange(self.partitions + 1))
        table = pa.table(
            {name: columns[name][order] for name in self.schema.names}, schema=self.schema
        )
        for p in range(self.partitions):
            if bounds[p + 1] > bounds[p]:
                self._writers[p].write_table(
                    table.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p]))
                )

    def read(self, partition: int) -> dict[str, np.ndarray]:
        """Every row of one partition in log order (``order`` ascending)."""
        table = pq.read_table(self.path(partition))
        columns = {name: table.column(name).to_numpy() for name in self.schema.names}
        order = np.argsort(columns[ORDER], kind="stable")
        return {name: values[order] for name, values in columns.items()}


def deduplicated(events: dict[str, np.ndarray], policy: DedupPolicy) -> dict[str, np.ndarray]:
    """``events`` (one partition, log order) with repeated (user, item) pairs resolved by
    ``policy``: all kept, the earliest, or the latest (by timestamp, then log order)."""
    if policy is DedupPolicy.KEEP_ALL or events[USER].size == 0:
        return events
    order = np.lexsort((events[ORDER], events[TIME], events[ITEM], events[USER]))
    user, item = events[USER][order], events[ITEM][order]
    same_as_previous = np.zeros(user.shape[0], dtype=bool)
    same_as_previous[1:] = (user[1:] == user[:-1]) & (item[1:] == item[:-1])
    if policy is DedupPolicy.FIRST:
        keep = ~same_as_previous
    else:
        keep = np.ones(user.shape[0], dtype=bool)
        keep[:-1] = ~same_as_previous[1:]
    chosen = np.sort(order[keep])  # back to log order
    return {name: values[chosen] for name, values in events.items()}


@dataclass(frozen=True)
class KCore:
    """Which users and items survive, and how many iterations reached the fixed point."""

    user_alive: np.ndarray
    item_alive: np.ndarray
    iterations: int


def k_core(
    partitions: Callable[[], Iterator[dict[str, np.ndarray]]],
    num_users: int,
    num_items: int,
    min_user_events: int,
    min_item_events: int,
) -> KCore:
    """Users with >= ``min_user_events`` and items with >= ``min_item_events`` events among
    the surviving ones, iterated until nothing changes.

    Args:
        partitions: a fresh iterator over every partition's (de-duplicated) events per call.
    """
    user_alive = np.ones(num_users, dtype=bool)
    item_alive = np.ones(num_items, dtype=bool)
    if min_user_events <= 1 and min_item_events <= 1:
        return KCore(user_alive, item_alive, 0)
    iterations = 0
    while True:
        iterations += 1
        user_count = np.zeros(num_users, dtype=np.int64)
        item_count = np.zeros(num_items, dtype=np.int64)
        for events in partitions():
            user, item = events[USER], events[ITEM]
            live = user_alive[user] & item_alive[item]
            user_count += np.bincount(user[live], minlength=num_users)
            item_count += np.bincount(item[live], minlength=num_items)
        new_users = user_alive & (user_count >= min_user_events)
        new_items = item_alive & (item_count >= min_item_events)
        if np.array_equal(new_users, user_alive) and np.array_equal(new_items, item_alive):
            return KCore(user_alive, item_alive, iterations)
        user_alive, item_alive = new_users, new_items


class TimeCounts:
    """Event counts per distinct timestamp, merged over partitions."""

    def __init__(self) -> None:
        self._values = np.zeros(0, np.int64)
        self._counts = np.zeros(0, np.int64)

    @classmethod
    def of(cls, values: np.ndarray, counts: np.ndarray) -> TimeCounts:
        """Counts saved from :attr:`values` and :attr:`counts`."""
        restored = cls()
        restored._values, restored._counts = values.astype(np.int64), counts.astype(np.int64)
        return restored

    def add(self, timestamps: np.ndarray) -> None:
        values, counts = np.unique(timestamps.astype(np.int64), return_counts=True)
        merged = np.concatenate([self._values, values])
        weights = np.concatenate([self._counts, counts])
        self._values, inverse = np.unique(merged, return_inverse=True)
        self._counts = np.bincount(inverse, weights=weights).astype(np.int64)

    @property
    def values(self) -> np.ndarray:
        """[T] int64 distinct timestamps, ascending."""
        return self._values

    @property
    def counts(self) -> np.ndarray:
        """[T] int64 events at each of :attr:`values`."""
        return self._counts

    @property
    def events(self) -> int:
        return int(self._counts.sum())

    def at(self, position: int) -> int:
        """The timestamp at 0-based ``position`` of all events sorted by time."""
        cumulative = np.cumsum(self._counts)
        return int(self._values[int(np.searchsorted(cumulative, position, side="right"))])

    def thresholds(self, valid_quantile: float, test_quantile: float) -> TemporalThresholds:
        """Exactly :func:`data_pipeline.datasets.split.temporal_thresholds` of the events
        counted, with the same errors."""
        return thresholds_at(self.at, self.events, valid_quantile, test_quantile)
