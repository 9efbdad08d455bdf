"""Features derived from stored columns at batch time (no change to the files on disk).

``hist_recent_item_ids``: the newest ``n`` items of ``hist_item_ids``, pooled on their own so the
most recent interests are not diluted by a long history's mean. It reads the shared ``item_id``
table, like the full history.

For the history encoder (``model.history.enabled``): each ``hist_<action>`` flag series becomes
an id feature of its own 2-row table (flag off / on), and ``hist_recency`` holds the bucketed time
between the event and each history entry (:func:`recency_bucket`), aligned with
``hist_item_ids``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.schema import (
    HISTORY_ITEMS,
    HISTORY_TIMESTAMPS,
    TIMESTAMP,
    EventSchema,
    FeatureKind,
    FeatureSpec,
    SchemaError,
    Side,
    history_action_column,
)

RECENT_HISTORY = "hist_recent_item_ids"
RECENCY = "hist_recency"
# Rows of each action table: flag off, flag on.
ACTION_TABLE_ROWS = 2


def recency_bucket(age_seconds: np.ndarray, num_buckets: int) -> np.ndarray:
    """Log-scale bucket of the time since a history event, in hours doubling per bucket.

    ``bucket = clamp(floor(log2(1 + max(age, 0) / 3600)), 0, num_buckets - 1)``: 0 is under an
    hour, 1 is 1-3 h, 2 is 3-7 h, ... 15 is about 3.7 years and more.

    Args:
        age_seconds: [...] int64 ages (negative ages clamp to 0).
    Returns:
        [...] int64 bucket ids in ``[0, num_buckets)``.
    """
    hours = np.maximum(age_seconds, 0).astype(np.float64) / 3600.0
    return np.clip(np.floor(np.log2(1.0 + hours)), 0, num_buckets - 1).astype(np.int64)


def history_feature_tables(schema: EventSchema, recency_buckets: int) -> dict[str, int]:
    """Tables of the encoder's per-event features: one 2-row table per action, and the
    recency table when the data has history timestamps and ``recency_buckets > 0``."""
    tables = {history_action_column(a): ACTION_TABLE_ROWS for a in schema.history_actions}
    if schema.has_history_timestamps and recency_buckets > 0:
        tables[RECENCY] = recency_buckets
    return tables


def with_derived_features(
    schema: EventSchema, recent_history: int, recency_buckets: int = -1
) -> EventSchema:
    """The model-facing schema: stored features plus the derived ones switched on.

    Args:
        recent_history: newest history items pooled as ``hist_recent_item_ids`` (0: off).
        recency_buckets: -1: no per-event history features; otherwise every ``hist_<action>``
            series becomes an IDS feature of its own table, plus ``hist_recency`` when > 0
            (:func:`history_feature_tables`).
    """
    names = {f.name for f in schema.features}
    features = list(schema.features)
    if recent_history > 0 and HISTORY_ITEMS in names:
        history = next(f for f in schema.features if f.name == HISTORY_ITEMS)
        features.append(FeatureSpec(RECENT_HISTORY, Side.USER, FeatureKind.IDS, history.table))
    if recency_buckets >= 0:
        for name in history_feature_tables(schema, recency_buckets):
            features.append(FeatureSpec(name, Side.USER, FeatureKind.IDS, name))
    return replace(schema, features=tuple(features))


def add_derived_columns(table: pa.Table, recent_history: int, recency_buckets: int = 0) -> pa.Table:
    """Append derived columns to an Arrow table of events (vectorized, no row loop)."""
    if recent_history > 0 and HISTORY_ITEMS in table.column_names:
        recent = pc.list_slice(table.column(HISTORY_ITEMS), 0, recent_history)
        table = table.append_column(RECENT_HISTORY, recent)
    if (
        recency_buckets > 0
        and HISTORY_ITEMS in table.column_names
        and RECENCY not in table.column_names
    ):
        table = table.append_column(RECENCY, _recency_column(table, recency_buckets))
    return table


def _recency_column(table: pa.Table, recency_buckets: int) -> pa.Array:
    """list<int64> recency bucket of every history entry, aligned with ``hist_item_ids``."""
    if HISTORY_TIMESTAMPS not in table.column_names:
        raise SchemaError(
            f"column '{HISTORY_TIMESTAMPS}' is missing: recency features need the event time of "
            "each history entry (prepare the data again with this version)"
        )
    times = table.column(HISTORY_TIMESTAMPS).combine_chunks()
    lengths = pc.list_value_length(times).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(times).to_numpy(zero_copy_only=False).astype(np.int64)
    now = table.column(TIMESTAMP).to_numpy().astype(np.int64)
    ages = np.repeat(now, lengths) - flat
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    buckets = pa.array(recency_bucket(ages, recency_buckets))
    return pa.ListArray.from_arrays(pa.array(offsets), buckets)
