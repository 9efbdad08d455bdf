"""Prepare-time feature columns shared by the converters: context, counters and text.

Every converter that offers these feature groups builds them here, so MovieLens and the synthetic
world name, type and size them the same way (see :mod:`data_pipeline.schema` for the contract).

* Context: ``ctx_hour`` (24 ids) and ``ctx_weekday`` (7 ids, Monday = 0) of the event's UTC
  timestamp; converters may add their own categorical context (device, locale) with
  :func:`context_spec`.
* Counters: point-in-time counts per event (:func:`data_pipeline.counters.point_in_time_counts`)
  and a per-item snapshot for the ``items/`` corpus (:func:`counter_snapshot`); each counter is a
  ``counter`` feature whose bucket table has :data:`COUNTER_BUCKETS` rows.
* Text: hashed unigram/bigram ids (:mod:`data_pipeline.text`) in table :data:`TEXT_TABLE`,
  weighted by idf.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from data_pipeline.counters import point_in_time_counts
from data_pipeline.schema import FeatureGroup, FeatureKind, FeatureSpec, Side

HOUR_OF_DAY = "ctx_hour"
DAY_OF_WEEK = "ctx_weekday"
TIME_CONTEXT_TABLES = {HOUR_OF_DAY: 24, DAY_OF_WEEK: 7}
# Bucket ids of a counter: 0 for a zero count, then one per power of two up to 2**22 and more.
COUNTER_BUCKETS = 24
# Shared hashed-token table of item text and search queries (same hash space, so a query word and
# a title word with the same spelling share one embedding unless a config gives them own tables).
TEXT_TABLE = "text_tokens"
_SECONDS_PER_DAY = 86_400
# 1970-01-01 was a Thursday: weekday (Monday = 0) of day d is (d + 3) mod 7.
_EPOCH_WEEKDAY = 3


def time_context(timestamps: np.ndarray) -> dict[str, np.ndarray]:
    """``[N]`` int64 UTC seconds -> ``{ctx_hour: [N] in [0, 24), ctx_weekday: [N] in [0, 7)}``
    (Monday = 0), int64."""
    seconds = np.asarray(timestamps, dtype=np.int64)
    days = np.floor_divide(seconds, _SECONDS_PER_DAY)
    hour = np.floor_divide(seconds - days * _SECONDS_PER_DAY, 3600)
    return {HOUR_OF_DAY: hour.astype(np.int64), DAY_OF_WEEK: ((days + _EPOCH_WEEKDAY) % 7)}


def context_spec(name: str) -> FeatureSpec:
    """A per-event user-side context id feature with its own table ``name``."""
    return FeatureSpec(name, Side.USER, FeatureKind.ID, name, FeatureGroup.CONTEXT, per_event=True)


def time_context_specs() -> list[FeatureSpec]:
    return [context_spec(name) for name in TIME_CONTEXT_TABLES]


def counter_spec(name: str) -> FeatureSpec:
    """An item-side counter feature; its bucket table is named after it."""
    return FeatureSpec(name, Side.ITEM, FeatureKind.COUNTER, name, FeatureGroup.COUNTER)


def counter_tables(names: list[str] | tuple[str, ...]) -> dict[str, int]:
    return {name: COUNTER_BUCKETS for name in names}


def text_spec(name: str, side: Side, *, per_event: bool = False) -> FeatureSpec:
    """Hashed text ids with idf weights (``<name>_weights``) in the shared text table."""
    group = FeatureGroup.SEARCH if side is Side.USER else FeatureGroup.TEXT
    return FeatureSpec(
        name, side, FeatureKind.IDS, TEXT_TABLE, group, weighted=True, per_event=per_event
    )


def counter_snapshot(
    item_ids: np.ndarray,
    timestamps: np.ndarray,
    event_flags: Mapping[str, np.ndarray],
    windows: Mapping[str, int],
    at: int,
    num_items: int,
) -> dict[str, np.ndarray]:
    """Every item's counters as of time ``at`` (events with ``at - w <= s < at``), for the
    ``items/`` corpus the model scores at evaluation and serving time.

    Args:
        item_ids, timestamps: ``[N]`` the events that may be counted (e.g. the train split only,
            so no held-out event leaks into the corpus).
        event_flags: kind -> ``[N]`` bool.
        windows: window name -> seconds.
        at: the snapshot time.
        num_items: I, the corpus size.
    Returns:
        counter name -> ``[I]`` int64 counts indexed by item id.
    """
    items = np.concatenate([np.asarray(item_ids, np.int64), np.arange(num_items, dtype=np.int64)])
    times = np.concatenate(
        [np.asarray(timestamps, np.int64), np.full(num_items, int(at), dtype=np.int64)]
    )
    flags = {
        kind: np.concatenate([np.asarray(values, bool), np.zeros(num_items, bool)])
        for kind, values in event_flags.items()
    }
    query = np.zeros(len(items), dtype=bool)
    query[len(items) - num_items :] = True
    counts = point_in_time_counts(items, times, flags, windows, query_mask=query)
    return {name: values[len(items) - num_items :] for name, values in counts.items()}
