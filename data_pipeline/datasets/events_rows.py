"""Event rows of one user partition (``prepare events``): split, point-in-time history, labels,
side-table features, time context and item counters, written split by split."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.datasets.event_features import (
    TIME_CONTEXT_TABLES,
    time_context,
    time_context_specs,
)
from data_pipeline.datasets.events_counters import EventCounters
from data_pipeline.datasets.events_features import SideTableFeatures
from data_pipeline.datasets.events_mapping import EventMapping
from data_pipeline.datasets.events_spill import ITEM, ORDER, TIME, USER
from data_pipeline.datasets.events_state import SpilledLog
from data_pipeline.datasets.history import (
    UserTimeline,
    build_timeline,
    history_for_rows,
    strictly_earlier_rank,
)
from data_pipeline.datasets.output import split_row_group_rows
from data_pipeline.datasets.split import (
    SPLIT_NAMES,
    TemporalThresholds,
    leave_last_out,
    temporal_split,
)
from data_pipeline.manifest import SplitInfo
from data_pipeline.schema import (
    HISTORY_ITEMS,
    HISTORY_TIMESTAMPS,
    ITEM_ID,
    POSITION,
    TIMESTAMP,
    USER_ID,
    EventSchema,
    FeatureKind,
    FeatureSpec,
    Side,
    history_action_column,
    label_column,
)
from data_pipeline.shard_writer import ShardWriter


def event_schema(
    mapping: EventMapping,
    user_side: SideTableFeatures,
    item_side: SideTableFeatures,
    real_time: bool,
    counters: EventCounters | None,
) -> EventSchema:
    history = FeatureSpec(HISTORY_ITEMS, Side.USER, FeatureKind.IDS, ITEM_ID)
    context = time_context_specs() if real_time else []
    counter_specs = counters.specs() if counters is not None else []
    return EventSchema(
        features=(*user_side.specs, history, *context, *item_side.specs, *counter_specs),
        labels=mapping.label_names(),
        history_actions=mapping.labels,
        has_position=True,
        has_ranker_score=False,
        has_history_timestamps=True,
    )


@dataclass(frozen=True)
class RowSources:
    """What every event row is built from besides its partition's events.

    Args:
        schema: the dataset's event schema.
        user_side, item_side: side-table features by dense id.
        thresholds: the temporal split's, or None (leave-last-out).
        counters: item counters, or None.
        history_length: H.
        chunk_rows: rows built at a time.
        row_group_rows, rows_per_file: Parquet layout.
    """

    schema: EventSchema
    user_side: SideTableFeatures
    item_side: SideTableFeatures
    thresholds: TemporalThresholds | None
    counters: EventCounters | None
    history_length: int
    chunk_rows: int
    row_group_rows: int
    rows_per_file: int


def split_of(
    events: dict[str, np.ndarray], thresholds: TemporalThresholds | None
) -> tuple[np.ndarray, np.ndarray, UserTimeline]:
    """[R] int8 split codes of one user partition's events, each event's history ``earlier``
    (:func:`~data_pipeline.datasets.history.history_for_rows`) and the timeline."""
    timeline = build_timeline(events[USER], events[TIME], events[ITEM])
    if thresholds is None:
        return leave_last_out(timeline), timeline.rank, timeline
    earlier = strictly_earlier_rank(timeline, events[TIME])
    return temporal_split(events[TIME], thresholds), earlier, timeline


def write_partition(
    folder: Path, partition: int, log: SpilledLog, sources: RowSources, sizes: dict[str, int]
) -> dict[str, SplitInfo]:
    """Partition ``partition``'s rows as ``folder/<split>/part-*.parquet``; ``sizes``: every
    split's rows over the whole log (the row-group size of small splits)."""
    writers = {
        name: ShardWriter(
            folder,
            name,
            sources.schema.event_arrow_schema(),
            sources.rows_per_file,
            split_row_group_rows(sizes[name], sources.row_group_rows),
        )
        for name in SPLIT_NAMES
    }
    for writer in writers.values():
        writer.__enter__()
    try:
        events = log.partition(partition)
        for code, table in partition_tables(partition, events, log, sources):
            writers[SPLIT_NAMES[code]].write(table)
    finally:
        for writer in writers.values():
            writer.__exit__(None, None, None)
    return {name: writer.info for name, writer in writers.items()}


def partition_tables(
    partition: int, events: dict[str, np.ndarray], log: SpilledLog, sources: RowSources
) -> Iterator[tuple[int, pa.Table]]:
    """(split code, event rows) of one partition, each split in (timestamp, user, item) order."""
    user, item, timestamp = events[USER], events[ITEM], events[TIME]
    codes, earlier, timeline = split_of(events, sources.thresholds)
    counts = (
        sources.counters.per_event(partition, events[ORDER]) if sources.counters is not None else {}
    )
    actions = {a: (events[a] > 0).astype(np.int8) for a in log.mapping.labels}
    names = sources.schema.event_arrow_schema().names
    context = any(f.name in TIME_CONTEXT_TABLES for f in sources.schema.features)
    output_order = np.lexsort((item, user, timestamp))
    for code in range(len(SPLIT_NAMES)):
        rows = output_order[codes[output_order] == code]
        for start in range(0, int(rows.shape[0]), sources.chunk_rows):
            chunk = rows[start : start + sources.chunk_rows]
            history = history_for_rows(
                timeline,
                item,
                actions,
                chunk,
                sources.history_length,
                timestamp,
                earlier=earlier,
            )
            columns: dict[str, Any] = {
                USER_ID: user[chunk],
                ITEM_ID: item[chunk],
                TIMESTAMP: timestamp[chunk],
                POSITION: pa.nulls(int(chunk.shape[0]), pa.int32()),
                **{label_column(n): events[n][chunk] for n in log.mapping.label_names()},
                HISTORY_ITEMS: history.item_ids_arrow(),
                **{history_action_column(a): history.action_arrow(a) for a in actions},
                HISTORY_TIMESTAMPS: history.timestamps_arrow(),
                **{name: values[chunk] for name, values in counts.items()},
            }
            taken = [
                sources.user_side.features.take(user[chunk]),
                sources.item_side.features.take(item[chunk]),
            ]
            if context:
                taken.append(time_context(timestamp[chunk]))
            for part in taken:
                columns.update({k: v for k, v in part.items() if k not in columns})
            yield code, pa.table({name: columns[name] for name in names})
