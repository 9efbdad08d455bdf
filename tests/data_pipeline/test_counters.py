"""Point-in-time counters: no leakage, streaming, normalization statistics, buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.counters import (
    HOUR,
    CounterStatistics,
    StreamingCounters,
    counter_bucket,
    counter_name,
    point_in_time_counts,
)

KINDS = ("view", "like")


def reference_counts(
    items: np.ndarray, times: np.ndarray, flags: dict[str, np.ndarray], windows: dict[str, int]
) -> dict[str, np.ndarray]:
    """O(N^2) definition: flagged events of the same item with ``t - w <= s < t``."""
    out = {}
    for kind, flag in flags.items():
        for name, w in windows.items():
            out[counter_name(kind, name)] = np.array(
                [
                    sum(
                        1
                        for j in range(len(items))
                        if items[j] == items[i] and flag[j] and times[i] - w <= times[j] < times[i]
                    )
                    for i in range(len(items))
                ],
                dtype=np.int64,
            )
    return out


@st.composite
def event_logs(draw, max_events: int = 40):
    n = draw(st.integers(0, max_events))
    # Few items and a short time range so that ties and window edges are common.
    items = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=np.int64)
    times = np.array(draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)), dtype=np.int64)
    flags = {
        k: np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
        for k in KINDS
    }
    windows = {
        f"w{i}": w for i, w in enumerate(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    }
    return items, times, flags, windows


def test_hand_example_with_ties_and_window_edges() -> None:
    items = np.array([7, 7, 7, 7, 8, 7])
    times = np.array([100, 0, 100, HOUR, 50, HOUR + 100])
    flags = {"view": np.ones(6, bool), "like": np.array([1, 1, 0, 0, 1, 0], bool)}
    counts = point_in_time_counts(items, times, flags, {"1h": HOUR})
    # t=100: only t=0 is before (the other t=100 is a tie); t=3600: [0, 3600) holds 0,100,100;
    # t=3700: [100, 3700) holds 100, 100, 3600 but not 0; item 8 sees nothing.
    assert counts["item_view_count_1h"].tolist() == [1, 0, 1, 3, 0, 3]
    assert counts["item_like_count_1h"].tolist() == [1, 0, 1, 2, 0, 1]


@settings(max_examples=80, deadline=None)
@given(log=event_logs())
def test_matches_brute_force_reference(log) -> None:
    items, times, flags, windows = log
    counts = point_in_time_counts(items, times, flags, windows)
    expected = reference_counts(items, times, flags, windows)
    assert counts.keys() == expected.keys()
    for name in expected:
        assert counts[name].dtype == np.int64
        assert counts[name].tolist() == expected[name].tolist(), name


@settings(max_examples=60, deadline=None)
@given(log=event_logs(), cutoff=st.integers(0, 31), seed=st.integers(0, 2**16))
def test_no_event_contributes_to_its_own_or_earlier_counters(log, cutoff: int, seed: int) -> None:
    """Rewriting everything at or after ``cutoff`` (flags of those events, plus extra events)
    leaves the counters of every event at or before ``cutoff`` unchanged."""
    items, times, flags, windows = log
    rng = np.random.default_rng(seed)
    before = point_in_time_counts(items, times, flags, windows)
    late = times >= cutoff
    extra = int(rng.integers(0, 10))
    new_items = np.concatenate([items, rng.integers(0, 4, extra)])
    new_times = np.concatenate([times, rng.integers(cutoff, cutoff + 20, extra)])
    new_flags = {
        k: np.concatenate([np.where(late, rng.random(len(v)) < 0.5, v), rng.random(extra) < 0.5])
        for k, v in flags.items()
    }
    after = point_in_time_counts(new_items, new_times, new_flags, windows)
    kept = times <= cutoff
    for name in before:
        assert after[name][: len(items)][kept].tolist() == before[name][kept].tolist()


def test_query_mask_only_limits_outputs() -> None:
    items, times = np.array([1, 1, 1]), np.array([0, 1, 2])
    flags = {"view": np.ones(3, bool)}
    counts = point_in_time_counts(items, times, flags, {"w": 10}, np.array([False, True, True]))
    assert counts["item_view_count_w"].tolist() == [0, 1, 2]


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="flags 'view'"):
        point_in_time_counts(np.zeros(3), np.zeros(3), {"view": np.ones(2, bool)}, {"w": 1})
    with pytest.raises(ValueError, match="window 'w'"):
        point_in_time_counts(np.zeros(3), np.zeros(3), {"view": np.ones(3, bool)}, {"w": 0})
    with pytest.raises(ValueError, match=r"\[N\]"):
        point_in_time_counts(np.zeros(3), np.zeros(2), {}, {"w": 1})


@settings(max_examples=50, deadline=None)
@given(log=event_logs(), cuts=st.lists(st.integers(0, 30), max_size=4))
def test_streaming_over_time_ordered_chunks_equals_one_shot(log, cuts: list[int]) -> None:
    items, times, flags, windows = log
    boundaries = sorted(set(cuts))
    expected = point_in_time_counts(items, times, flags, windows)
    streaming = StreamingCounters(KINDS, windows)
    got: dict[str, list[np.ndarray]] = {name: [] for name in expected}
    order = []
    # Chunk k holds times in [edge_k, edge_k+1); rows inside a chunk keep their shuffled order.
    for low, high in zip([-1, *boundaries], [*boundaries, 10**9]):
        rows = np.flatnonzero((times >= low) & (times < high))
        order.append(rows)
        chunk = streaming.update(items[rows], times[rows], {k: v[rows] for k, v in flags.items()})
        for name, values in chunk.items():
            got[name].append(values)
    rows = np.concatenate(order) if order else np.zeros(0, np.int64)
    for name in expected:
        assert np.concatenate(got[name]).tolist() == expected[name][rows].tolist()
    # Only the last max(window) time units are carried.
    if len(times):
        assert (streaming.carried_timestamps >= times.max() - max(windows.values())).all()


def test_streaming_rejects_out_of_order_chunks_and_unknown_kinds() -> None:
    streaming = StreamingCounters(("view",), {"w": 5})
    streaming.update(np.array([1]), np.array([10]), {"view": np.ones(1, bool)})
    # Ties across the boundary are allowed and do not count each other.
    tie = streaming.update(np.array([1]), np.array([10]), {"view": np.ones(1, bool)})
    assert tie["item_view_count_w"].tolist() == [0]
    with pytest.raises(ValueError, match="time-ordered"):
        streaming.update(np.array([1]), np.array([9]), {"view": np.ones(1, bool)})
    with pytest.raises(ValueError, match="event kinds"):
        streaming.update(np.array([1]), np.array([11]), {"click": np.ones(1, bool)})


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(0, 10**6), min_size=1, max_size=50),
    split=st.integers(0, 50),
)
def test_statistics_merge_chunks_and_round_trip_through_json(values: list[int], split: int) -> None:
    counts = np.array(values)
    stats = CounterStatistics()
    stats.update({"c": counts[:split]}).update({"c": counts[split:]})
    entry = stats.to_manifest()["c"]
    logs = np.log1p(counts.astype(np.float64))
    assert entry["count"] == len(values)
    assert entry["mean"] == pytest.approx(logs.mean(), rel=1e-9, abs=1e-9)
    assert entry["std"] == pytest.approx(logs.std(), rel=1e-6, abs=1e-9)
    restored = CounterStatistics.from_manifest(json.loads(json.dumps(stats.to_manifest())))
    assert restored.to_manifest()["c"] == pytest.approx(entry, rel=1e-12)
    np.testing.assert_allclose(
        restored.normalize({"c": counts})["c"], stats.normalize({"c": counts})["c"], rtol=1e-6
    )


def test_normalize_standardizes_log_counts() -> None:
    counts = {"a": np.array([0, 1, 3, 7, 100]), "const": np.array([4, 4, 4])}
    stats = CounterStatistics().update(counts)
    normalized = stats.normalize(counts)
    assert normalized["a"].dtype == np.float32
    assert normalized["a"].mean() == pytest.approx(0.0, abs=1e-6)
    assert normalized["a"].std() == pytest.approx(1.0, abs=1e-5)
    assert normalized["const"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="missing"):
        stats.normalize({"missing": np.array([1])})
    with pytest.raises(ValueError, match="'bad'"):
        CounterStatistics.from_manifest({"bad": {"mean": 0.0}})


def test_counter_bucket_edges() -> None:
    counts = np.array([0, 1, 2, 3, 4, 7, 8, 2**40, -3])
    assert counter_bucket(counts, 20).tolist() == [0, 1, 2, 2, 3, 3, 4, 19, 0]
    assert counter_bucket(counts, 1).tolist() == [0] * len(counts)
    assert counter_bucket(np.array([[1, 1024]]), 64).tolist() == [[1, 11]]
    with pytest.raises(ValueError, match="num_buckets"):
        counter_bucket(counts, 0)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 2**50), min_size=1, max_size=60),
    num_buckets=st.integers(1, 64),
)
def test_counter_bucket_is_monotone_and_in_range(counts: list[int], num_buckets: int) -> None:
    ordered = np.sort(np.array(counts, dtype=np.int64))
    buckets = counter_bucket(ordered, num_buckets)
    assert (np.diff(buckets) >= 0).all()
    assert ((buckets >= 0) & (buckets < num_buckets)).all()
    expected = [min(c.bit_length(), num_buckets - 1) for c in ordered.tolist()]
    assert buckets.tolist() == expected
