"""A user's own interaction log -> twotower event shards (``twotower prepare events``).

Passes, none holding the log (:mod:`data_pipeline.datasets.events_spill`):

1. read every chunk, checking it (:mod:`~data_pipeline.datasets.events_source`), and collect
   the distinct raw users and items: the global id maps;
2. read again and spill each event, in dense ids, to the hash partition of its user;
3. de-duplicate per user (``dedup``), then the k-core fixed point (``min_user_events``,
   ``min_item_events``), then renumber the surviving ids densely;
4. count events per second and per user: the temporal thresholds and every split's size;
5. with a timestamp: point-in-time item counters, through two more spills by item and back
   (:mod:`~data_pipeline.datasets.events_counters`);
6. per partition: timeline, split (leave-last-out or global temporal), point-in-time history,
   user/item table features, counters and time context, written to ``train/ valid/ test/``.

Everything is written to a staging folder beside ``out`` and moved into place at the end, so a
bad input leaves a previous dataset in ``out`` untouched and no half-written one. Output::

    train/ valid/ test/   events; each split partition by partition, in (timestamp, user, item)
    items/ users/         one row per dense id with that side's features
    raw_ids/users.parquet raw_ids/items.parquet   dense id -> raw id (string)
    manifest.json

Without a timestamp column the order of appearance is the time (history and leave-last-out
follow it; time context and counters are left out; the temporal split needs real times). Same input, same
output bytes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.datasets.event_features import (
    TEXT_TABLE,
    TIME_CONTEXT_TABLES,
    time_context,
    time_context_specs,
)
from data_pipeline.datasets.events_counters import EventCounters, event_counters
from data_pipeline.datasets.events_features import SideTableFeatures, side_table_features
from data_pipeline.datasets.events_mapping import EventMapping
from data_pipeline.datasets.events_source import (
    CHUNK_ROWS,
    InputFormat,
    event_chunks,
    file_format,
    input_files,
)
from data_pipeline.datasets.events_spill import (
    ITEM,
    ORDER,
    TIME,
    USER,
    DistinctIds,
    IdMap,
    PartitionSpill,
    TimeCounts,
    deduplicated,
    k_core,
    partitions_for,
)
from data_pipeline.datasets.history import (
    UserTimeline,
    build_timeline,
    history_for_rows,
    strictly_earlier_rank,
)
from data_pipeline.datasets.movielens import split_row_group_rows
from data_pipeline.datasets.output import write_side_file, write_side_table
from data_pipeline.datasets.split import (
    MIN_EVENTS_TO_HOLD_OUT,
    SPLIT_NAMES,
    SplitConfig,
    SplitProtocol,
    TemporalThresholds,
    leave_last_out,
    temporal_split,
)
from data_pipeline.manifest import Manifest, SplitInfo, sha256_file
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
    SchemaError,
    Side,
    history_action_column,
    label_column,
)
from data_pipeline.shard_writer import ShardWriter
from data_pipeline.text import TextHashConfig

logger = logging.getLogger(__name__)

DATASET = "events"


@dataclass(frozen=True)
class EventsOptions:
    """How ``prepare events`` writes (flags of the command).

    Args:
        split: leave-last-out (default) or temporal.
        history_length: H, the most history events per row.
        partition_events: events per spill partition (the memory bound of the per-user passes).
        row_group_rows: Parquet row-group size of the event splits (smaller splits get smaller).
        rows_per_file: rows per Parquet file.
        text: hashing of text columns.
        input_format: force one format for every input file (default: by suffix).
        chunk_rows: rows per input chunk.
        counters: point-in-time item counters (with a timestamp column only).
    """

    split: SplitConfig = SplitConfig()
    history_length: int = 50
    partition_events: int = 2_000_000
    row_group_rows: int = 65_536
    rows_per_file: int = 1_000_000
    text: TextHashConfig = TextHashConfig(1 << 15, 16, bigrams=True)
    input_format: InputFormat | None = None
    chunk_rows: int = CHUNK_ROWS
    counters: bool = True


def prepare_events(
    source: str | Path, out: str | Path, mapping: EventMapping, options: EventsOptions
) -> Manifest:
    """Convert the log at ``source`` (file, folder or glob) into ``out``; returns the manifest.

    Raises:
        SchemaError: bad input (names file, row and column); ``out`` is left as it was.
        ValueError: a mapping or split that cannot work (names the flag or key).
    """
    out = Path(out)
    files = input_files(source)
    real_time = mapping.timestamp is not None and not any(
        file_format(f, options.input_format) is InputFormat.SEQUENCE for f in files
    )
    if options.split.protocol is SplitProtocol.TEMPORAL and not real_time:
        raise ValueError(
            "--split temporal needs event times: name the timestamp column (--timestamp-column "
            "or the mapping's timestamp); the sequence format has only an order"
        )
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _prepare(files, staging, mapping, options, real_time)
        shutil.rmtree(staging / "_spill")
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s: %s", out, {name: info.rows for name, info in manifest.splits.items()})
    return Manifest.load(out)


def _swap_into_place(staging: Path, out: Path) -> None:
    previous = out.parent / f".{out.name}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


@dataclass
class _Log:
    """The spilled log and its id maps after de-duplication and the k-core."""

    spill: PartitionSpill
    mapping: EventMapping
    users: IdMap
    items: IdMap
    user_new: np.ndarray  # [U0] old dense id -> new (-1 dropped)
    item_new: np.ndarray
    input_events: int
    k_core_iterations: int

    def partition(self, p: int) -> dict[str, np.ndarray]:
        """Partition ``p``'s surviving events in new dense ids, log order."""
        events = deduplicated(self.spill.read(p), self.mapping.dedup)
        user, item = self.user_new[events[USER]], self.item_new[events[ITEM]]
        live = (user >= 0) & (item >= 0)
        kept = {name: values[live] for name, values in events.items()}
        kept[USER], kept[ITEM] = user[live], item[live]
        return kept

    def partitions(self) -> Iterator[dict[str, np.ndarray]]:
        for p in range(self.spill.partitions):
            yield self.partition(p)


def _prepare(
    files: list[Path], staging: Path, mapping: EventMapping, options: EventsOptions, real_time: bool
) -> Manifest:
    log = _spilled_log(files, staging, mapping, options)
    counts, user_events = TimeCounts(), np.zeros(len(log.users), np.int64)
    for events in log.partitions():
        counts.add(events[TIME])
        user_events += np.bincount(events[USER], minlength=len(log.users))
    if counts.events == 0:
        raise SchemaError(
            f"no events left after the k-core (min_user_events={mapping.min_user_events}, "
            f"min_item_events={mapping.min_item_events}): lower them"
        )
    thresholds = None
    if options.split.protocol is SplitProtocol.TEMPORAL:
        thresholds = counts.thresholds(options.split.valid_quantile, options.split.test_quantile)
    counters = None
    if real_time and options.counters:
        counters = event_counters(
            lambda: ((events, split_of(events, thresholds)[0]) for events in log.partitions()),
            log.spill.partitions,
            staging / "_spill",
            mapping.labels,
            len(log.items),
            thresholds.valid_start if thresholds is not None else None,
        )
    user_side = side_table_features(mapping.users, Side.USER, log.users, options.text)
    item_side = side_table_features(mapping.items, Side.ITEM, log.items, options.text)
    sources = _RowSources(
        _schema(mapping, user_side, item_side, real_time, counters),
        user_side,
        item_side,
        thresholds,
        counters,
        options,
    )
    splits = _write_splits(staging, log, sources, _split_sizes(counts, user_events, thresholds))
    splits["users"] = write_side_table(
        staging, sources.schema, Side.USER, user_side.features.columns, options.row_group_rows
    )
    item_columns = {**item_side.features.columns, **(counters.snapshot if counters else {})}
    splits["items"] = write_side_table(
        staging, sources.schema, Side.ITEM, item_columns, options.row_group_rows
    )
    extra = _extra(staging, log, counts, user_events, splits, thresholds, user_side, item_side)
    if counters is not None:
        extra["counters"] = counters.to_manifest(mapping.labels)
    manifest = Manifest(
        dataset=DATASET,
        schema=sources.schema,
        tables=_tables(user_side, item_side, real_time, counters, options),
        splits=splits,
        history_length=options.history_length,
        source=_source(files, mapping),
        extra=extra,
        counters=counters.statistics if counters is not None else {},
    )
    manifest.save(staging)
    return manifest


def _spilled_log(
    files: list[Path], staging: Path, mapping: EventMapping, options: EventsOptions
) -> _Log:
    """Passes 1-3 (module docstring)."""
    distinct_users, distinct_items, events = DistinctIds(), DistinctIds(), 0
    for chunk in event_chunks(files, mapping, options.input_format, options.chunk_rows):
        distinct_users.add(chunk.user)
        distinct_items.add(chunk.item)
        events += chunk.rows
    if events == 0:
        raise SchemaError(f"{[str(f) for f in files]}: no events")
    users, items = distinct_users.id_map(), distinct_items.id_map()
    partitions = partitions_for(events, options.partition_events)
    labels = mapping.label_names()
    with PartitionSpill.of_events(staging / "_spill" / "events", partitions, labels) as spill:
        order = 0
        for chunk in event_chunks(files, mapping, options.input_format, options.chunk_rows):
            positions = np.arange(order, order + chunk.rows, dtype=np.int64)
            spill.write(
                {
                    USER: users.dense(chunk.user),
                    ITEM: items.dense(chunk.item),
                    TIME: chunk.timestamp if chunk.timestamp is not None else positions,
                    ORDER: positions,
                    **chunk.labels,
                }
            )
            order += chunk.rows
    provisional = _Log(
        spill, mapping, users, items, np.arange(len(users)), np.arange(len(items)), events, 0
    )
    core = k_core(
        provisional.partitions,
        len(users),
        len(items),
        mapping.min_user_events,
        mapping.min_item_events,
    )
    kept_users, user_new = users.keep(core.user_alive)
    kept_items, item_new = items.keep(core.item_alive)
    return _Log(spill, mapping, kept_users, kept_items, user_new, item_new, events, core.iterations)


def _schema(
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


def _split_sizes(
    counts: TimeCounts, user_events: np.ndarray, thresholds: TemporalThresholds | None
) -> dict[str, int]:
    """Rows of each split, known before writing (for the row-group size of small splits)."""
    total = counts.events
    if thresholds is None:
        held_out = int((user_events >= MIN_EVENTS_TO_HOLD_OUT).sum())
        return {"train": total - 2 * held_out, "valid": held_out, "test": held_out}
    codes = temporal_split(counts.values, thresholds)
    per_code = np.bincount(codes, weights=counts.counts, minlength=3).astype(np.int64)
    return dict(zip(SPLIT_NAMES, (int(c) for c in per_code), strict=True))


@dataclass(frozen=True)
class _RowSources:
    """What every event row is built from besides its partition's events."""

    schema: EventSchema
    user_side: SideTableFeatures
    item_side: SideTableFeatures
    thresholds: TemporalThresholds | None
    counters: EventCounters | None
    options: EventsOptions


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


def _write_splits(
    staging: Path, log: _Log, sources: _RowSources, sizes: dict[str, int]
) -> dict[str, SplitInfo]:
    options = sources.options
    writers = {
        name: ShardWriter(
            staging,
            name,
            sources.schema.event_arrow_schema(),
            options.rows_per_file,
            split_row_group_rows(sizes[name], options.row_group_rows),
        )
        for name in SPLIT_NAMES
    }
    for writer in writers.values():
        writer.__enter__()
    try:
        for partition, events in enumerate(log.partitions()):
            for code, table in _partition_tables(partition, events, log, sources):
                writers[SPLIT_NAMES[code]].write(table)
    finally:
        for writer in writers.values():
            writer.__exit__(None, None, None)
    return {name: writer.info for name, writer in writers.items()}


def _partition_tables(
    partition: int, events: dict[str, np.ndarray], log: _Log, sources: _RowSources
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
        for start in range(0, int(rows.shape[0]), sources.options.chunk_rows):
            chunk = rows[start : start + sources.options.chunk_rows]
            history = history_for_rows(
                timeline,
                item,
                actions,
                chunk,
                sources.options.history_length,
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


def _tables(
    user_side: SideTableFeatures,
    item_side: SideTableFeatures,
    real_time: bool,
    counters: EventCounters | None,
    options: EventsOptions,
) -> dict[str, int]:
    tables = {**user_side.features.table_sizes, **item_side.features.table_sizes}
    if real_time:
        tables.update(TIME_CONTEXT_TABLES)
    if item_side.text:
        tables[TEXT_TABLE] = options.text.vocab_size
    if counters is not None:
        tables.update(counters.tables())
    return tables


def _source(files: list[Path], mapping: EventMapping) -> dict[str, Any]:
    return {
        "kind": DATASET,
        "files": {str(f): sha256_file(f) for f in files},
        "mapping": {
            "user": mapping.user,
            "item": mapping.item,
            "timestamp": mapping.timestamp,
            "labels": list(mapping.labels),
            "dedup": mapping.dedup.value,
            "min_user_events": mapping.min_user_events,
            "min_item_events": mapping.min_item_events,
            "items": str(mapping.items.path) if mapping.items else None,
            "users": str(mapping.users.path) if mapping.users else None,
        },
    }


def _extra(
    staging: Path,
    log: _Log,
    counts: TimeCounts,
    user_events: np.ndarray,
    splits: dict[str, SplitInfo],
    thresholds: TemporalThresholds | None,
    user_side: SideTableFeatures,
    item_side: SideTableFeatures,
) -> dict[str, Any]:
    raw_ids = {
        "users": write_side_file(
            staging,
            "raw_ids/users.parquet",
            pa.table({USER_ID: np.arange(len(log.users)), "raw_user_id": log.users.raw}),
        ),
        "items": write_side_file(
            staging,
            "raw_ids/items.parquet",
            pa.table({ITEM_ID: np.arange(len(log.items)), "raw_item_id": log.items.raw}),
        ),
    }
    extra: dict[str, Any] = {
        "counts": {
            "input_events": log.input_events,
            "events": counts.events,
            "users": len(log.users),
            "items": len(log.items),
            "users_without_holdout": int((user_events < MIN_EVENTS_TO_HOLD_OUT).sum()),
            **{f"{name}_rows": info.rows for name, info in splits.items()},
        },
        "k_core": {
            "min_user_events": log.mapping.min_user_events,
            "min_item_events": log.mapping.min_item_events,
            "iterations": log.k_core_iterations,
        },
        "dedup": log.mapping.dedup.value,
        "id_ranges": {"user_id": [0, len(log.users) - 1], "item_id": [0, len(log.items) - 1]},
        "event_order": (
            "history: per user by (timestamp, item_id, position in the log); shards: partition "
            "by partition (user_id mod P), then (timestamp, user_id, item_id)"
        ),
        "spill_partitions": log.spill.partitions,
        "raw_ids": raw_ids,
        "vocabularies": {**user_side.features.vocabularies, **item_side.features.vocabularies},
        "text": item_side.text,
    }
    if thresholds is None:
        extra["split_rule"] = (
            "leave-last-out per user; users with fewer than "
            f"{MIN_EVENTS_TO_HOLD_OUT} events are train only"
        )
    else:
        extra["split"] = thresholds.to_manifest("event timestamps")
        extra["split_rule"] = thresholds.rule_text("event-time")
    return extra
