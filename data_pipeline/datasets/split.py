"""Temporal leave-last-out split, per user, in the deterministic timeline order.

A user's last event goes to ``test``, the second-to-last to ``valid``, the rest to ``train``.
Users with fewer than :data:`MIN_EVENTS_TO_HOLD_OUT` events keep everything in ``train``: holding
out one of two events would leave almost no history to learn from, and such users are too few in
MovieLens (which requires 20 ratings per user) to matter for evaluation.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.datasets.history import UserTimeline

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
MIN_EVENTS_TO_HOLD_OUT = 3


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
