"""Point-in-time history and leave-last-out split, against a plain-Python reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.datasets.history import (
    backward_gather_index,
    build_timeline,
    history_for_rows,
    jagged_offsets,
    strictly_earlier_rank,
)
from data_pipeline.datasets.split import TEST, TRAIN, VALID, leave_last_out


def random_log(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small log: unique (user, item) pairs, timestamps from a tiny range so ties are common."""
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, 4), st.integers(0, 9)),
            min_size=1,
            max_size=40,
            unique=True,
        )
    )
    timestamps = draw(st.lists(st.integers(0, 4), min_size=len(pairs), max_size=len(pairs)))
    likes = draw(st.lists(st.integers(0, 1), min_size=len(pairs), max_size=len(pairs)))
    user = np.array([p[0] for p in pairs], dtype=np.int64)
    item = np.array([p[1] for p in pairs], dtype=np.int64)
    return user, item, np.array(timestamps, dtype=np.int64), np.array(likes, dtype=np.int8)


@st.composite
def logs_and_history_length(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    return random_log(draw), draw(st.integers(1, 6))


def reference_history(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, history_length: int
) -> list[list[int]]:
    """Input indices of each event's history, by brute force over the deterministic order."""
    key = [(int(user[i]), int(timestamp[i]), int(item[i]), i) for i in range(len(user))]
    result = []
    for i in range(len(user)):
        earlier = [j for j in range(len(user)) if key[j][0] == key[i][0] and key[j] < key[i]]
        earlier.sort(key=lambda j: key[j], reverse=True)
        result.append(earlier[:history_length])
    return result


@settings(max_examples=30, deadline=None)
@given(logs_and_history_length())
def test_history_never_leaks(case) -> None:  # type: ignore[no-untyped-def]
    (user, item, timestamp, like), history_length = case
    timeline = build_timeline(user, timestamp, item)
    rows = np.arange(len(user), dtype=np.int64)
    history = history_for_rows(timeline, item, {"like": like}, rows, history_length)
    expected = reference_history(user, item, timestamp, history_length)
    for row in range(len(user)):
        lo, hi = history.offsets[row], history.offsets[row + 1]
        got_items = history.item_ids[lo:hi].tolist()
        got_likes = history.actions["like"][lo:hi].tolist()
        assert got_items == [int(item[j]) for j in expected[row]]
        assert got_likes == [int(like[j]) for j in expected[row]]
        assert len(got_items) <= history_length
        assert int(item[row]) not in got_items  # own event (pairs are unique)
        # Every history event is the same user's, at or before this timestamp, newest first.
        same_user = {int(item[j]): int(timestamp[j]) for j in np.flatnonzero(user == user[row])}
        times = [same_user[i] for i in got_items]
        assert all(t <= timestamp[row] for t in times)
        assert times == sorted(times, reverse=True)


def test_timestamp_ties_break_by_item_then_input_order() -> None:
    user = np.array([0, 0, 0, 0])
    item = np.array([7, 3, 5, 5])
    timestamp = np.array([10, 10, 10, 10])
    timeline = build_timeline(user, timestamp, item)
    assert timeline.order.tolist() == [1, 2, 3, 0]
    assert timeline.rank.tolist() == [3, 0, 1, 2]
    history = history_for_rows(timeline, item, {}, np.array([0, 1]), 10)
    assert history.offsets.tolist() == [0, 3, 3]
    assert history.item_ids.tolist() == [5, 5, 3]


def test_history_rows_can_be_any_subset_in_any_order() -> None:
    user = np.array([1, 0, 1, 0, 1])
    item = np.array([0, 1, 2, 3, 4])
    timestamp = np.array([5, 1, 3, 2, 4])
    timeline = build_timeline(user, timestamp, item)
    history = history_for_rows(timeline, item, {}, np.array([0, 3]), 2)
    # user 1 at t=5 saw items 4 (t=4) and 2 (t=3); user 0 at t=2 saw item 1.
    assert history.item_ids.tolist() == [4, 2, 1]
    assert history.item_ids_arrow().to_pylist() == [[4, 2], [1]]


def test_backward_gather_and_offsets() -> None:
    ends = np.array([5, 2, 9])
    lengths = np.array([3, 0, 2])
    assert backward_gather_index(ends, lengths).tolist() == [4, 3, 2, 8, 7]
    assert jagged_offsets(lengths).tolist() == [0, 3, 3, 5]


@settings(max_examples=30, deadline=None)
@given(logs_and_history_length())
def test_leave_last_out(case) -> None:  # type: ignore[no-untyped-def]
    (user, item, timestamp, _), _ = case
    split = leave_last_out(build_timeline(user, timestamp, item))
    assert len(split) == len(user)  # every event lands in exactly one split
    for u in np.unique(user):
        events = np.flatnonzero(user == u)
        ordered = sorted(events, key=lambda i: (timestamp[i], item[i], i))
        if len(events) < 3:
            assert (split[events] == TRAIN).all()
            continue
        assert split[ordered[-1]] == TEST
        assert split[ordered[-2]] == VALID
        assert (split[ordered[:-2]] == TRAIN).all()


def reference_strict_history(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, history_length: int
) -> list[list[int]]:
    """Input indices of each event's user's events of strictly earlier seconds, newest first in
    the deterministic order, at most ``history_length``."""
    key = [(int(timestamp[i]), int(item[i]), i) for i in range(len(user))]
    result = []
    for i in range(len(user)):
        earlier = [j for j in range(len(user)) if user[j] == user[i] and key[j][0] < key[i][0]]
        earlier.sort(key=lambda j: key[j], reverse=True)
        result.append(earlier[:history_length])
    return result


@settings(max_examples=30, deadline=None)
@given(logs_and_history_length())
def test_strictly_earlier_history_drops_same_second_events(case) -> None:  # type: ignore[no-untyped-def]
    (user, item, timestamp, like), history_length = case
    timeline = build_timeline(user, timestamp, item)
    earlier = strictly_earlier_rank(timeline, timestamp)
    expected_rank = [
        int(((user == user[i]) & (timestamp < timestamp[i])).sum()) for i in range(len(user))
    ]
    assert earlier.tolist() == expected_rank
    rows = np.arange(len(user), dtype=np.int64)[::-1].copy()  # any order
    batch = history_for_rows(
        timeline, item, {"like": like}, rows, history_length, timestamp, earlier=earlier
    )
    expected = reference_strict_history(user, item, timestamp, history_length)
    for r, row in enumerate(rows.tolist()):
        values = slice(int(batch.offsets[r]), int(batch.offsets[r + 1]))
        assert batch.item_ids[values].tolist() == [int(item[j]) for j in expected[row]]
        assert batch.actions["like"][values].tolist() == [int(like[j]) for j in expected[row]]
        assert (batch.timestamps[values] < timestamp[row]).all()
