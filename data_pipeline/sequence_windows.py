"""Sequence mode: training windows of each user's newest events, built from the event rows.

A window is one user's last event of the split together with that row's stored point-in-time
history (``hist_item_ids``, newest first, at most ``manifest.history_length``): the user's
newest ``1 + H`` events of the split, as SASRec trains on each user's newest ``max_length``
items. Position ``p`` of a window (``0 <= p < min(len(history), L)``) is the user just after
history event ``p``; its target is the event that followed it: the row's own event for
``p = 0``, history event ``p - 1`` otherwise. Every target has a non-empty history, and a user
whose only event of the split has none gives no window.

Labels of a history event come from its action series: a label that is also a history action
(``like``; in own logs every label is one) takes that action's flag, any other label is 1, since
an event enters a history only when the user interacted with it (every MovieLens rating is a
``click``; the synthetic world's histories hold clicks). A non-engaging target therefore gets
net user value 0, so weight 0 in the softmax, while it still feeds the history of later
positions.

Finding each user's last row takes one pass over three columns of the split, keeping two
arrays of ``tables["user_id"]`` entries: memory by users, not by events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_pipeline.batch import Batch, BatchBuilder
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.reader import WorkUnit, read_unit
from data_pipeline.schema import (
    HISTORY_ITEMS,
    HISTORY_TIMESTAMPS,
    ITEM_ID,
    TIMESTAMP,
    USER_ID,
    SchemaError,
    history_action_column,
    label_column,
)

_NONE = np.iinfo(np.int64).min


@dataclass(frozen=True)
class LastEvents:
    """Each user's last event of a split by ``(timestamp, item_id)``, the order histories use.

    Args:
        timestamp: [U] int64 (int64 min: the user has no event).
        item: [U] int64 (-1: none).
    """

    timestamp: np.ndarray
    item: np.ndarray

    @staticmethod
    def scan(units: Sequence[WorkUnit], num_users: int) -> LastEvents:
        """One pass over ``units`` reading user, timestamp and item only.

        Raises:
            SchemaError: a user id outside ``[0, num_users)``, naming file and row group.
        """
        timestamp = np.full(num_users, _NONE, dtype=np.int64)
        item = np.full(num_users, -1, dtype=np.int64)
        for unit in units:
            table = read_unit(unit, [USER_ID, TIMESTAMP, ITEM_ID])
            user, ts, it = (_ints(table, name) for name in (USER_ID, TIMESTAMP, ITEM_ID))
            if user.size and (user.min() < 0 or user.max() >= num_users):
                raise SchemaError(
                    f"{unit.path}: row group {unit.row_group}: column '{USER_ID}' has ids "
                    f"outside [0, {num_users})"
                )
            order = np.lexsort((it, ts, user))
            user, ts, it = user[order], ts[order], it[order]
            last = np.flatnonzero(np.r_[user[1:] != user[:-1], True]) if user.size else order[:0]
            user, ts, it = user[last], ts[last], it[last]
            later = (ts > timestamp[user]) | ((ts == timestamp[user]) & (it > item[user]))
            timestamp[user[later]] = ts[later]
            item[user[later]] = it[later]
        return LastEvents(timestamp, item)

    def __call__(self, table: pa.Table) -> pa.Table:
        """The rows of ``table`` that are their user's last event and have a history (a user
        with one event has no position to train)."""
        user = _ints(table, USER_ID)
        history = pc.list_value_length(table.column(HISTORY_ITEMS)).fill_null(0)
        keep = (
            (_ints(table, TIMESTAMP) == self.timestamp[user])
            & (_ints(table, ITEM_ID) == self.item[user])
            & (history.to_numpy(zero_copy_only=False) > 0)
        )
        return table.filter(pa.array(keep))


def _ints(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64)


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, [R] offsets of each row's first value) of a list column."""
    column = table.column(name).combine_chunks()
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.cumsum(lengths) - lengths
    return values, offsets.astype(np.int64)


@dataclass(frozen=True)
class WindowTargets:
    """Where each position's target lives: window ``window`` [N], position ``position`` [N],
    and for ``position >= 1`` the flat history index ``source`` [N] (0 where position is 0)."""

    window: np.ndarray
    position: np.ndarray
    source: np.ndarray

    @staticmethod
    def of(lengths: np.ndarray, offsets: np.ndarray, max_length: int) -> WindowTargets:
        """Targets of windows with history ``lengths`` [W] starting at flat ``offsets`` [W]."""
        counts = np.minimum(lengths, max_length).astype(np.int64)
        window = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
        position = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        source = np.where(position > 0, offsets[window] + position - 1, 0)
        return WindowTargets(window, position, source)

    @property
    def is_own_row(self) -> np.ndarray:
        return self.position == 0


@dataclass(frozen=True)
class WindowBatchBuilder:
    """Window rows (each user's last event, with its history) -> a sequence-mode ``Batch``.

    Args:
        rows: the per-row builder (user features of the windows, the rows' own labels).
        store: item features of every target, as ``items/`` holds them.
        max_length: L, the most positions per window (``model.history.max_length``).

    The batch's ``user_features`` have stride W (windows), every other field has one entry
    per target, window-major and newest position first; ``window_targets`` [W] counts them.
    """

    rows: BatchBuilder
    store: ItemFeatureStore
    max_length: int

    def __call__(self, table: pa.Table) -> Batch:
        schema = self.rows.schema
        missing = [
            label_column(x) for x in schema.labels if label_column(x) not in table.column_names
        ]
        if missing:
            raise SchemaError(f"sequence windows need the label columns {missing}")
        own = self.rows(table)
        history, offsets = _list_column(table, HISTORY_ITEMS)
        lengths = np.diff(np.r_[offsets, history.shape[0]])
        targets = WindowTargets.of(lengths, offsets, self.max_length)
        own_row, window, source = targets.is_own_row, targets.window, targets.source
        item = np.where(own_row, _ints(table, ITEM_ID)[window], _take(history, source))
        labels = np.empty((window.shape[0], len(schema.labels)), dtype=np.float32)
        own_labels = own.labels.numpy()
        for index, name in enumerate(schema.labels):
            if name in schema.history_actions:
                flags, _ = _list_column(table, history_action_column(name))
                earlier = _take(flags, source).astype(np.float32)
            else:
                earlier = np.ones(window.shape[0], dtype=np.float32)
            labels[:, index] = np.where(own_row, own_labels[window, index], earlier)
        if schema.has_history_timestamps:
            times, _ = _list_column(table, HISTORY_TIMESTAMPS)
            timestamp = np.where(own_row, own.timestamp.numpy()[window], _take(times, source))
        else:
            timestamp = np.where(own_row, own.timestamp.numpy()[window], -1)
        rows = window.shape[0]
        item_ids = torch.from_numpy(item.astype(np.int64))
        return Batch(
            user_features=own.user_features,
            item_features=self.store.lookup(item_ids),
            labels=torch.from_numpy(labels),
            position=torch.full((rows,), -1, dtype=torch.int64),
            user_ids=own.user_ids[torch.from_numpy(window)],
            item_ids=item_ids,
            ranker_score=torch.full((rows,), float("nan")),
            impression_negatives=torch.zeros((rows, 0), dtype=torch.int64),
            weight=torch.ones(rows, dtype=torch.float32),
            timestamp=torch.from_numpy(timestamp.astype(np.int64)),
            window_targets=torch.from_numpy(np.minimum(lengths, self.max_length).astype(np.int64)),
        )


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]``, where an empty ``values`` (no window has history) gives zeros."""
    if values.shape[0] == 0:
        return np.zeros(index.shape[0], dtype=values.dtype)
    return values[index]
