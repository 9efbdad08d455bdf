"""Point-in-time dynamic counters: how often an item was viewed, liked, clicked recently.

For every event ``e`` = (item, t) and every (kind, window ``w``), the counter is the number of
events of the same item flagged with that kind whose timestamp ``s`` satisfies

    ``t - w <= s < t``

Tie rule: the window is closed at its start and open at its end, so an event never counts itself
nor any event logged at the same timestamp (same-second events are treated as simultaneous: none
of them saw the others). That is the no-leakage contract the prepare step relies on.

Counters are fed to the model twice: as dense inputs after ``log1p`` and standardization with
statistics saved in the manifest (:class:`CounterStatistics`), and as embedding ids after
log-scale bucketization (:func:`counter_bucket`).

Memory: :func:`point_in_time_counts` holds O(N) int64 arrays for N events (a few sorts of N and 2N
keys). For logs that do not fit, :class:`StreamingCounters` takes time-ordered chunks and carries
only the events of the last ``max(windows)`` seconds between them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HOUR = 3600
DAY = 24 * HOUR
DEFAULT_WINDOWS: dict[str, int] = {"1h": HOUR, "1d": DAY, "7d": 7 * DAY}
# Standard deviations below this are treated as 1: a constant counter becomes 0, not inf/nan.
_MIN_STD = 1e-6


def counter_name(kind: str, window: str) -> str:
    """Column name of one counter, e.g. ``item_click_count_1d``."""
    return f"item_{kind}_count_{window}"


def _validate(
    item_ids: np.ndarray,
    timestamps: np.ndarray,
    event_flags: Mapping[str, np.ndarray],
    windows: Mapping[str, int],
) -> None:
    n = len(item_ids)
    if item_ids.ndim != 1 or timestamps.shape != (n,):
        raise ValueError(
            f"item_ids and timestamps must be [N]; got {item_ids.shape}, {timestamps.shape}"
        )
    for kind, flags in event_flags.items():
        if np.shape(flags) != (n,):
            raise ValueError(f"event flags {kind!r} must be [{n}], got {np.shape(flags)}")
    for name, seconds in windows.items():
        if int(seconds) <= 0:
            raise ValueError(f"counter window {name!r} must be > 0 seconds, got {seconds}")


def _lexicographic_left(
    sorted_items: np.ndarray,
    sorted_times: np.ndarray,
    query_items: np.ndarray,
    query_times: np.ndarray,
) -> np.ndarray:
    """For each query, the first index ``j`` of the (item, time)-sorted events with
    ``(item_j, time_j) >= (query_item, query_time)``: ``np.searchsorted(side="left")`` on a pair
    key, done by one stable merge so no combined integer key can overflow.

    Args:
        sorted_items, sorted_times: ``[N]`` events sorted by (item, time).
        query_items, query_times: ``[M]`` queries in any order.
    Returns:
        ``[M]`` int64 indices in ``[0, N]``.
    """
    n = len(sorted_items)
    items = np.concatenate([sorted_items, query_items])
    times = np.concatenate([sorted_times, query_times])
    # Queries sort before events with an equal key, which makes the search "left".
    is_event = np.concatenate(
        [np.ones(n, dtype=np.int8), np.zeros(len(query_items), dtype=np.int8)]
    )
    order = np.lexsort((is_event, times, items))
    events_in_order = is_event[order].astype(np.int64)
    events_before = np.cumsum(events_in_order) - events_in_order
    positions = np.empty(len(query_items), dtype=np.int64)
    query_slots = events_in_order == 0
    positions[order[query_slots] - n] = events_before[query_slots]
    return positions


def point_in_time_counts(
    item_ids: np.ndarray,
    timestamps: np.ndarray,
    event_flags: Mapping[str, np.ndarray],
    windows: Mapping[str, int] = DEFAULT_WINDOWS,
    query_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Trailing-window counts per event, strictly before each event (see the module's tie rule).

    Args:
        item_ids: ``[N]`` int item ids.
        timestamps: ``[N]`` int timestamps (any unit shared with ``windows``), in any order.
        event_flags: kind -> ``[N]`` bool, whether the event is of that kind (view, like, click);
            pass all-true flags to count every event.
        windows: window name -> length (e.g. ``{"1h": 3600}``).
        query_mask: ``[N]`` bool, events whose counters are wanted (default all); the others only
            contribute as history. :class:`StreamingCounters` uses it for carried events.
    Returns:
        :func:`counter_name` ``(kind, window)`` -> ``[N]`` int64 counts in the input order (0 where
        ``query_mask`` is false).
    """
    items = np.asarray(item_ids, dtype=np.int64)
    times = np.asarray(timestamps, dtype=np.int64)
    _validate(items, times, event_flags, windows)
    order = np.lexsort((times, items))
    sorted_items, sorted_times = items[order], times[order]
    queries = order if query_mask is None else order[np.asarray(query_mask, dtype=bool)[order]]
    q_items, q_times = items[queries], times[queries]
    # End of the window: the first event of the item at or after t (excludes t itself and ties).
    ends = _lexicographic_left(sorted_items, sorted_times, q_items, q_times)
    starts = {
        name: _lexicographic_left(sorted_items, sorted_times, q_items, q_times - int(seconds))
        for name, seconds in windows.items()
    }
    out: dict[str, np.ndarray] = {}
    for kind, flags in event_flags.items():
        # cumulative[j] = flagged events among the first j sorted events.
        cumulative = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(np.asarray(flags, dtype=bool)[order], out=cumulative[1:])
        for name, start in starts.items():
            counts = np.zeros(len(items), dtype=np.int64)
            counts[queries] = cumulative[ends] - cumulative[start]
            out[counter_name(kind, name)] = counts
    return out


@dataclass
class StreamingCounters:
    """:func:`point_in_time_counts` over a log delivered in time-ordered chunks.

    Each chunk may be unordered inside, but its earliest timestamp must be >= the latest one of
    the previous chunk. Between chunks only the events of the last ``max(windows)`` time units are
    kept, so memory is bounded by the events of one window plus one chunk. Results equal the
    one-shot computation over the concatenated log.
    """

    event_kinds: tuple[str, ...]
    windows: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_WINDOWS))
    _items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _flags: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def update(
        self, item_ids: np.ndarray, timestamps: np.ndarray, event_flags: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Counters of one chunk (``[n]`` inputs, same contract as :func:`point_in_time_counts`)."""
        times = np.asarray(timestamps, dtype=np.int64)
        if set(event_flags) != set(self.event_kinds):
            raise ValueError(
                f"event kinds {sorted(event_flags)} != configured {sorted(self.event_kinds)}"
            )
        if len(times) and len(self._times) and times.min() < self._times.max():
            raise ValueError(
                f"chunks must be time-ordered: chunk starts at {times.min()}, "
                f"before the previous chunk's last event at {self._times.max()}"
            )
        carried = len(self._items)
        items = np.concatenate([self._items, np.asarray(item_ids, dtype=np.int64)])
        times = np.concatenate([self._times, times])
        flags = {
            k: np.concatenate(
                [self._flags.get(k, np.zeros(0, bool)), np.asarray(event_flags[k], bool)]
            )
            for k in self.event_kinds
        }
        query_mask = np.arange(len(items)) >= carried
        counts = point_in_time_counts(items, times, flags, self.windows, query_mask)
        self._carry(items, times, flags)
        return {name: values[carried:] for name, values in counts.items()}

    @property
    def carried_timestamps(self) -> np.ndarray:
        """``[K]`` timestamps of the events kept as history for the next chunk."""
        return self._times.copy()

    def _carry(self, items: np.ndarray, times: np.ndarray, flags: dict[str, np.ndarray]) -> None:
        if len(times) == 0:
            return
        # A future event at t >= latest sees back to t - max_window >= latest - max_window.
        keep = times >= times.max() - max(int(s) for s in self.windows.values())
        self._items, self._times = items[keep], times[keep]
        self._flags = {k: v[keep] for k, v in flags.items()}


def log_counts(counts: np.ndarray) -> np.ndarray:
    """``[...]`` counts -> ``[...]`` float64 ``log1p(counts)``."""
    return np.log1p(np.asarray(counts, dtype=np.float64))


@dataclass
class _Moments:
    """Running count, mean and sum of squared deviations (Chan et al. parallel update)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        n = len(values)
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0


@dataclass
class CounterStatistics:
    """Mean and std of ``log1p(counter)`` per counter, fitted on the training split (possibly over
    several chunks with :meth:`update`) and stored in the manifest with :meth:`to_manifest`."""

    moments: dict[str, _Moments] = field(default_factory=dict)

    def update(self, counts: Mapping[str, np.ndarray]) -> CounterStatistics:
        """Add ``[N]`` counts per counter name; returns ``self``."""
        for name, values in counts.items():
            self.moments.setdefault(name, _Moments()).add(log_counts(values).ravel())
        return self

    def to_manifest(self) -> dict[str, dict[str, Any]]:
        """JSON-safe ``{name: {"mean": float, "std": float, "count": int}}``."""
        return {
            name: {"mean": m.mean, "std": m.std, "count": m.count}
            for name, m in sorted(self.moments.items())
        }

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Mapping[str, Any]]) -> CounterStatistics:
        stats = cls()
        for name, values in entry.items():
            try:
                count, mean, std = int(values["count"]), float(values["mean"]), float(values["std"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"counter statistics {name!r} in the manifest need numeric mean, std and "
                    f"count; got {dict(values)!r}"
                ) from error
            stats.moments[name] = _Moments(count, mean, std * std * count)
        return stats

    def normalize(self, counts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``[N]`` counts per name -> ``[N]`` float32 ``(log1p(count) - mean) / std`` (a std below
        1e-6, i.e. a constant counter, is replaced by 1)."""
        out = {}
        for name, values in counts.items():
            if name not in self.moments:
                raise KeyError(
                    f"no normalization statistics for counter {name!r}; have {sorted(self.moments)}"
                )
            m = self.moments[name]
            std = m.std if m.std >= _MIN_STD else 1.0
            out[name] = ((log_counts(values) - m.mean) / std).astype(np.float32)
        return out


def counter_bucket(counts: np.ndarray, num_buckets: int) -> np.ndarray:
    """Log-scale embedding id of a count: 0 for 0, then one bucket per power of two.

    ``bucket = 0 if count <= 0 else min(floor(log2(count)) + 1, num_buckets - 1)``: 1 -> 1,
    2-3 -> 2, 4-7 -> 3, ... Monotone non-decreasing in the count.

    Args:
        counts: ``[...]`` non-negative integer counts.
        num_buckets: table rows (>= 1).
    Returns:
        ``[...]`` int64 ids in ``[0, num_buckets)``.
    """
    if num_buckets < 1:
        raise ValueError(f"counter num_buckets must be >= 1, got {num_buckets}")
    values = np.asarray(counts, dtype=np.int64)
    # frexp's exponent is floor(log2(x)) + 1, exact for integers below 2**53 (no log rounding).
    _, exponent = np.frexp(np.maximum(values, 1).astype(np.float64))
    buckets = np.where(values > 0, exponent, 0)
    return np.minimum(buckets, num_buckets - 1).astype(np.int64)
