"""Point-in-time user histories, vectorized with numpy.

Every event gets the items its user interacted with *strictly before it* in one deterministic
order: ``(user, timestamp, item_id, input index)``. Timestamp ties are therefore broken by item id
and then by input position, so a history can never hold the event itself nor an event ordered
after it, and the same log always gives the same histories.

The work is split in two so that memory stays bounded for large logs (ml-20m: 20M events × H):

1. :func:`build_timeline` sorts once and keeps ``O(N)`` integer arrays.
2. :func:`history_for_rows` gathers the ``[sum(lengths)]`` history values for any subset of rows
   (a write chunk), so only one chunk's histories are ever materialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class UserTimeline:
    """Events of a log arranged in the deterministic per-user order.

    Args:
        order: [N] int64, input indices sorted by ``(user, timestamp, item, input index)``.
        sorted_position: [N] int64, where each input event sits in ``order`` (inverse of order).
        rank: [N] int64, 0-based rank of each input event within its user's timeline.
        user_event_count: [N] int64, number of events of each input event's user.
    """

    order: np.ndarray
    sorted_position: np.ndarray
    rank: np.ndarray
    user_event_count: np.ndarray

    @property
    def num_events(self) -> int:
        return int(self.order.shape[0])


@dataclass(frozen=True)
class HistoryBatch:
    """Histories of R rows as one jagged block, newest first.

    Args:
        offsets: [R + 1] int32, row r owns ``values[offsets[r]:offsets[r + 1]]``.
        item_ids: [sum(lengths)] int64 history item ids.
        actions: action name -> [sum(lengths)] int8 series aligned with ``item_ids``.
        timestamps: [sum(lengths)] int64 event time of each history entry.
    """

    offsets: np.ndarray
    item_ids: np.ndarray
    actions: dict[str, np.ndarray]
    timestamps: np.ndarray

    def item_ids_arrow(self) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(self.offsets), pa.array(self.item_ids))

    def action_arrow(self, action: str) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(self.offsets), pa.array(self.actions[action]))

    def timestamps_arrow(self) -> pa.ListArray:
        return pa.ListArray.from_arrays(
            pa.array(self.offsets), pa.array(self.timestamps, pa.int64())
        )


def build_timeline(user: np.ndarray, timestamp: np.ndarray, item: np.ndarray) -> UserTimeline:
    """Sort a log into per-user timelines.

    Args:
        user: [N] integer user ids.
        timestamp: [N] integer event times.
        item: [N] integer item ids (the tie-breaker for equal timestamps).
    """
    n = int(user.shape[0])
    # lexsort is stable, so full ties (same user, time and item) keep their input order.
    order = np.lexsort((item, timestamp, user)).astype(np.int64)
    sorted_position = np.empty(n, dtype=np.int64)
    sorted_position[order] = np.arange(n, dtype=np.int64)
    sorted_user = user[order]
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = sorted_user[1:] != sorted_user[:-1]
    start_index = np.flatnonzero(is_start)
    run_length = np.diff(np.append(start_index, n))
    run_of_sorted = np.cumsum(is_start) - 1
    rank_sorted = np.arange(n, dtype=np.int64) - start_index[run_of_sorted]
    count_sorted = run_length[run_of_sorted]
    return UserTimeline(
        order=order,
        sorted_position=sorted_position,
        rank=rank_sorted[sorted_position].astype(np.int64),
        user_event_count=count_sorted[sorted_position].astype(np.int64),
    )


def strictly_earlier_rank(timeline: UserTimeline, timestamp: np.ndarray) -> np.ndarray:
    """How many of each event's user's events have a strictly smaller timestamp.

    ``timeline.rank`` also counts same-second events ordered before it (by item id); this count
    drops them, for histories that must hold only events before the row's own second.

    Args:
        timeline: from :func:`build_timeline` over the log.
        timestamp: [N] integer event times, input order.

    Returns:
        [N] int64, ``<= timeline.rank``, input order.
    """
    n = timeline.num_events
    sorted_rank = timeline.rank[timeline.order]
    sorted_time = np.asarray(timestamp)[timeline.order]
    is_start = sorted_rank == 0  # a user's first event
    is_start[1:] |= sorted_time[1:] != sorted_time[:-1]
    positions = np.arange(n, dtype=np.int64)
    # Sorted position of the first event of each (user, second) run.
    run_start = np.maximum.accumulate(np.where(is_start, positions, 0))
    strict_sorted = sorted_rank - (positions - run_start)
    return strict_sorted[timeline.sorted_position].astype(np.int64)


def jagged_offsets(lengths: np.ndarray) -> np.ndarray:
    """[R] lengths -> [R + 1] int32 offsets (Arrow ``list`` offsets)."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{offsets[-1]} history values in one chunk; write smaller chunks")
    return offsets.astype(np.int32)


def backward_gather_index(ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices ``ends[r] - 1, ends[r] - 2, ..., ends[r] - lengths[r]`` for every row r, concatenated.

    Args:
        ends: [R] int64 exclusive end of each row's window in the source array.
        lengths: [R] int64 window lengths.

    Returns:
        [sum(lengths)] int64 source indices, newest (highest index) first within each row.
    """
    total = int(lengths.sum())
    row_of_value = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    step = np.arange(total, dtype=np.int64) - starts[row_of_value]
    return ends[row_of_value] - 1 - step


def history_for_rows(
    timeline: UserTimeline,
    item: np.ndarray,
    actions: dict[str, np.ndarray],
    rows: np.ndarray,
    history_length: int,
    timestamp: np.ndarray | None = None,
    earlier: np.ndarray | None = None,
) -> HistoryBatch:
    """Point-in-time histories of selected events.

    Args:
        timeline: from :func:`build_timeline` over the whole log.
        item: [N] int64 item ids, input order.
        actions: action name -> [N] int8 per-event action (``like``), input order.
        timestamp: [N] int64 event times, input order (None: zeros in ``timestamps``).
        rows: [R] int64 input indices to build histories for, in output order.
        history_length: H, the most history events kept per row.
        earlier: [N] int64, how many of the user's first timeline events form each event's
            history, ``<= timeline.rank`` (None: ``timeline.rank``, every event ordered before it;
            :func:`strictly_earlier_rank` for events of earlier seconds only).

    Returns:
        R histories, each the last ``min(earlier, H)`` of the user's first ``earlier`` events,
        newest first.
    """
    earlier_rows = timeline.rank[rows] if earlier is None else earlier[rows]
    lengths = np.minimum(earlier_rows, history_length)
    # The user's previous events sit just before the row in the sorted order; the history ends
    # ``rank - earlier`` events before it.
    ends = timeline.sorted_position[rows] - timeline.rank[rows] + earlier_rows
    source = timeline.order[backward_gather_index(ends, lengths)]
    return HistoryBatch(
        offsets=jagged_offsets(lengths),
        item_ids=item[source].astype(np.int64),
        actions={name: values[source].astype(np.int8) for name, values in actions.items()},
        timestamps=(
            timestamp[source].astype(np.int64)
            if timestamp is not None
            else np.zeros(source.shape[0], np.int64)
        ),
    )
