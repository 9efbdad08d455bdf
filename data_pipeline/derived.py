"""Features derived from stored columns at batch time (no change to the files on disk).

``hist_recent_item_ids``: the newest ``n`` items of ``hist_item_ids``, pooled on their own so the
most recent interests are not diluted by a long history's mean. It reads the shared ``item_id``
table, like the full history.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.schema import HISTORY_ITEMS, EventSchema, FeatureKind, FeatureSpec, Side

RECENT_HISTORY = "hist_recent_item_ids"


def with_derived_features(schema: EventSchema, recent_history: int) -> EventSchema:
    """The model-facing schema: stored features plus the derived ones switched on."""
    names = {f.name for f in schema.features}
    if recent_history <= 0 or HISTORY_ITEMS not in names:
        return schema
    history = next(f for f in schema.features if f.name == HISTORY_ITEMS)
    recent = FeatureSpec(RECENT_HISTORY, Side.USER, FeatureKind.IDS, history.table)
    return replace(schema, features=(*schema.features, recent))


def add_derived_columns(table: pa.Table, recent_history: int) -> pa.Table:
    """Append derived columns to an Arrow table of events (vectorized, no row loop)."""
    if recent_history > 0 and HISTORY_ITEMS in table.column_names:
        recent = pc.list_slice(table.column(HISTORY_ITEMS), 0, recent_history)
        table = table.append_column(RECENT_HISTORY, recent)
    return table
