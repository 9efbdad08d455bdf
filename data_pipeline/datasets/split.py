"""Event splits: per-user leave-last-out, and a global temporal split.

**Leave-last-out** (:func:`leave_last_out`, ``--split leave-last-out``, MovieLens' default): a
user's last event goes to ``test``, the second-to-last to ``valid``, the rest to ``train``, in the
deterministic timeline order. Users with fewer than :data:`MIN_EVENTS_TO_HOLD_OUT` events keep
everything in ``train``: holding out one of two events would leave almost no history to learn
from, and such users are too few in MovieLens (which requires 20 ratings per user) to matter for
evaluation. Train then holds other users' events that post-date most test events.

**Global temporal** (:func:`temporal_split`, ``--split temporal``): two timestamps cut the whole
log, ``train`` = events with ``timestamp < T1``, ``valid`` = ``T1 <= timestamp < T2``, ``test`` =
``timestamp >= T2``, so nothing in training happened after any evaluated event.
``T1`` and ``T2`` are quantiles of event time (:func:`temporal_thresholds`): ``T = t_(floor(q·N))``,
the time of the event at 0-based position ``floor(q · N)`` of the log sorted by time. Every event
at a threshold's second falls on the later side, so ties are deterministic and
``train < T1 <= valid < T2 <= test`` holds strictly; train then holds at most ``floor(q1 · N)``
events (fewer when the event at that position ties earlier ones).

Queries under the temporal split follow the global-temporal ("timeline") protocol of the
evaluation literature (Meng et al., *Exploring Data Splitting Strategies for the Evaluation of
Recommendation Models*, RecSys 2020; Sun, *Take a Fresh Look at Recommender Systems from an
Evaluation Standpoint*, SIGIR 2023; Ji et al., *A Critical Study on Data Leakage in Recommender
System Offline Evaluation*, TOIS 2023): **every** held-out event is one query row, carrying the
history its user had at that event's time, not only each user's first held-out event. Users and
items first seen after ``T1`` stay in (cold-start queries count, as they would online).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from data_pipeline.datasets.history import UserTimeline

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
MIN_EVENTS_TO_HOLD_OUT = 3
DEFAULT_VALID_QUANTILE = 0.8
DEFAULT_TEST_QUANTILE = 0.9
# Quantiles arrive as decimal flags; fractions derived from them are rounded back to decimals.
FRACTION_DIGITS = 12


class SplitProtocol(StrEnum):
    """How events are assigned to train/valid/test (the ``--split`` flag)."""

    LEAVE_LAST_OUT = "leave-last-out"
    TEMPORAL = "temporal"


def check_quantiles(valid_quantile: float, test_quantile: float) -> None:
    """Raise ``ValueError`` naming the flag unless ``0 < valid_quantile < test_quantile < 1``."""
    if not 0 < valid_quantile < 1:
        raise ValueError(f"--valid-quantile must lie in (0, 1); got {valid_quantile}")
    if not 0 < test_quantile < 1:
        raise ValueError(f"--test-quantile must lie in (0, 1); got {test_quantile}")
    if not valid_quantile < test_quantile:
        raise ValueError(
            f"--valid-quantile ({valid_quantile}) must be below --test-quantile ({test_quantile}): "
            "valid is the time range [T1, T2) between them"
        )


@dataclass(frozen=True)
class SplitConfig:
    """The split of an event-log converter.

    Args:
        protocol: leave-last-out per user, or the global temporal split.
        valid_quantile, test_quantile: q1 < q2 in (0, 1), the event-time quantiles of ``T1`` and
            ``T2`` (temporal only; checked for every protocol).
    """

    protocol: SplitProtocol = SplitProtocol.LEAVE_LAST_OUT
    valid_quantile: float = DEFAULT_VALID_QUANTILE
    test_quantile: float = DEFAULT_TEST_QUANTILE

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", SplitProtocol(self.protocol))
        check_quantiles(self.valid_quantile, self.test_quantile)


@dataclass(frozen=True)
class TemporalThresholds:
    """``T1`` (first valid second) and ``T2`` (first test second) of a temporal split.

    Args:
        valid_start: T1; train is every event with ``timestamp < T1``.
        test_start: T2; test is every event with ``timestamp >= T2``.
        valid_quantile, test_quantile: the quantiles they were taken at.
    """

    valid_start: int
    test_start: int
    valid_quantile: float
    test_quantile: float

    def to_manifest(self, quantile_of: str) -> dict[str, object]:
        """``manifest.extra["split"]``; ``quantile_of`` says what was ranked (events, sessions)."""
        return {
            "protocol": SplitProtocol.TEMPORAL.value,
            "valid_quantile": self.valid_quantile,
            "test_quantile": self.test_quantile,
            "valid_start_timestamp": self.valid_start,
            "test_start_timestamp": self.test_start,
            "quantile_of": quantile_of,
            "rule": (
                "train: timestamp < valid_start_timestamp (T1); valid: T1 <= timestamp < T2; "
                "test: timestamp >= test_start_timestamp (T2)"
            ),
            "queries": "every valid/test event is one query row",
        }

    def rule_text(self, quantile_of: str) -> str:
        """``manifest.extra["split_rule"]``, one line."""
        return (
            f"global temporal: train = events before T1 = {self.valid_start} ({quantile_of} "
            f"quantile {self.valid_quantile:g}), valid = [T1, T2 = {self.test_start}) (quantile "
            f"{self.test_quantile:g}), test = from T2 on; every valid/test event is a query"
        )


def leave_last_out(timeline: UserTimeline) -> np.ndarray:
    """Assign every event to a split.

    Args:
        timeline: per-user order of the log (ties already broken deterministically).

    Returns:
        [N] int8 split code per input event: :data:`TRAIN`, :data:`VALID` or :data:`TEST`.
    """
    from_end = timeline.user_event_count - 1 - timeline.rank
    eligible = timeline.user_event_count >= MIN_EVENTS_TO_HOLD_OUT
    split = np.full(timeline.num_events, TRAIN, dtype=np.int8)
    split[eligible & (from_end == 1)] = VALID
    split[eligible & (from_end == 0)] = TEST
    return split


def temporal_thresholds(
    timestamp: np.ndarray, valid_quantile: float, test_quantile: float
) -> TemporalThresholds:
    """``T1``, ``T2`` at event-time quantiles: ``T = sorted(timestamp)[floor(q · N)]``.

    Args:
        timestamp: [N] int64 event times, N >= 1.
        valid_quantile, test_quantile: ``0 < q1 < q2 < 1``.

    Raises:
        ValueError: bad quantiles, or a split that would be empty (names the flag to change).
    """
    ordered = np.sort(np.asarray(timestamp, dtype=np.int64))
    return thresholds_at(
        lambda position: int(ordered[position]),
        int(ordered.shape[0]),
        valid_quantile,
        test_quantile,
    )


def thresholds_at(
    at: Callable[[int], int], n: int, valid_quantile: float, test_quantile: float
) -> TemporalThresholds:
    """:func:`temporal_thresholds` of ``n`` events given ``at(position)``, the time of the event
    at a 0-based position of the log sorted by time (for logs counted, not held, in memory)."""
    check_quantiles(valid_quantile, test_quantile)
    if n == 0:
        raise ValueError("temporal split of an empty event log")
    valid_start = at(min(n - 1, math.floor(valid_quantile * n)))
    test_start = at(min(n - 1, math.floor(test_quantile * n)))
    if valid_start == at(0):
        raise ValueError(
            f"--valid-quantile {valid_quantile}: T1 = {valid_start} is the log's first second, "
            "so train would be empty; raise --valid-quantile"
        )
    if valid_start == test_start:
        raise ValueError(
            f"--valid-quantile {valid_quantile} and --test-quantile {test_quantile} give the same "
            f"second T1 = T2 = {valid_start}, so valid would be empty; move them further apart"
        )
    return TemporalThresholds(valid_start, test_start, valid_quantile, test_quantile)


def temporal_split(timestamp: np.ndarray, thresholds: TemporalThresholds) -> np.ndarray:
    """[N] int8 split codes: TRAIN before T1, VALID in [T1, T2), TEST from T2 on.

    Args:
        timestamp: [N] int64 event times.
        thresholds: from :func:`temporal_thresholds`.
    """
    split = np.full(timestamp.shape[0], TRAIN, dtype=np.int8)
    split[timestamp >= thresholds.valid_start] = VALID
    split[timestamp >= thresholds.test_start] = TEST
    return split


def session_fractions(valid_quantile: float, test_quantile: float) -> tuple[float, float]:
    """Session-time quantiles -> ``(valid_fraction, test_fraction)`` of the synthetic world:
    ``(q2 - q1, 1 - q2)``, rounded to decimals so ``0.9, 0.95`` give exactly ``0.05, 0.05``."""
    check_quantiles(valid_quantile, test_quantile)
    return (
        round(test_quantile - valid_quantile, FRACTION_DIGITS),
        round(1 - test_quantile, FRACTION_DIGITS),
    )


def session_quantiles(valid_fraction: float, test_fraction: float) -> tuple[float, float]:
    """Inverse of :func:`session_fractions`: ``(1 - valid - test, 1 - test)``, rounded."""
    return (
        round(1 - valid_fraction - test_fraction, FRACTION_DIGITS),
        round(1 - test_fraction, FRACTION_DIGITS),
    )


def split_user_counts(user: np.ndarray, codes: np.ndarray) -> dict[str, int]:
    """``<split>_users`` (distinct users) per split and ``<split>_rows_without_train_events``
    (eval rows of users with no train event: cold-start queries) for valid and test.

    Args:
        user: [N] int64 user id per event.
        codes: [N] int8 split code per event.
    """
    train_users = np.unique(user[codes == TRAIN])
    counts: dict[str, int] = {}
    for code, name in enumerate(SPLIT_NAMES):
        users = user[codes == code]
        counts[f"{name}_users"] = int(np.unique(users).size)
        if code != TRAIN:
            counts[f"{name}_rows_without_train_events"] = int((~np.isin(users, train_users)).sum())
    return counts
