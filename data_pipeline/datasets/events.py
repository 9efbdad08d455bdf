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
bad input leaves a previous dataset in ``out`` untouched and no half-written one.

Stages (``--stage``), for logs beyond one machine: ``global`` runs passes 1-5 with
``--partitions N`` spill partitions and saves their state (:mod:`~data_pipeline.datasets.
events_state`); ``partition --partition P`` writes partition P's rows (the N jobs may run at
once, e.g. as a SLURM job array: ``launch.slurm_prepare``); ``merge`` gathers them, writes the
side tables and the manifest and moves the dataset into place. ``all`` (the default) runs the
three in one process, through the same files. Output::

    train/ valid/ test/   events; each split partition by partition, in (timestamp, user, item)
    items/ users/         one row per dense id with that side's features
    raw_ids/users.parquet raw_ids/items.parquet   dense id -> raw id (string)
    manifest.json

Without a timestamp column the order of appearance is the time (history and leave-last-out
follow it; time context and counters are left out; the temporal split needs real times). Same input, same
output bytes.
"""

from __future__ import annotations

import enum
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.datasets.event_features import TEXT_TABLE, TIME_CONTEXT_TABLES
from data_pipeline.datasets.events_counters import EventCounters, event_counters
from data_pipeline.datasets.events_features import SideTableFeatures, side_table_features
from data_pipeline.datasets.events_mapping import EventMapping
from data_pipeline.datasets.events_rows import RowSources, event_schema, split_of, write_partition
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
    PartitionSpill,
    TimeCounts,
    k_core,
    partitions_for,
)
from data_pipeline.datasets.events_state import (
    SPILL,
    GlobalState,
    SpilledLog,
    load_state,
    save_state,
)
from data_pipeline.datasets.output import write_side_table
from data_pipeline.datasets.split import (
    MIN_EVENTS_TO_HOLD_OUT,
    SPLIT_NAMES,
    SplitConfig,
    SplitProtocol,
    TemporalThresholds,
    temporal_split,
)
from data_pipeline.manifest import Manifest, ShardFile, SplitInfo, sha256_file
from data_pipeline.schema import SchemaError, Side
from data_pipeline.text import TextHashConfig

logger = logging.getLogger(__name__)

DATASET = "events"
PARTS = "parts"


class Stage(enum.Enum):
    """Which part of the conversion a process runs (module docstring)."""

    ALL = "all"
    GLOBAL = "global"
    PARTITION = "partition"
    MERGE = "merge"


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
        partitions: spill partitions (the staged jobs' N); None: from ``partition_events``.
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
    partitions: int | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The options every stage must share (the global stage fixes ``partitions``)."""
        return {
            "split": [
                self.split.protocol.value,
                self.split.valid_quantile,
                self.split.test_quantile,
            ],
            "history_length": self.history_length,
            "row_group_rows": self.row_group_rows,
            "rows_per_file": self.rows_per_file,
            "text": [self.text.vocab_size, self.text.max_tokens, self.text.bigrams],
            "input_format": self.input_format.value if self.input_format else None,
            "counters": self.counters,
        }


def prepare_events(
    source: str | Path,
    out: str | Path,
    mapping: EventMapping,
    options: EventsOptions,
    stage: Stage = Stage.ALL,
    partition: int | None = None,
) -> Manifest | None:
    """Convert the log at ``source`` (file, folder or glob) into ``out``; returns the manifest
    (None for the global and partition stages, which leave their work in the staging folder).

    Raises:
        SchemaError: bad input (names file, row and column); ``out`` is left as it was.
        ValueError: a mapping, split or stage that cannot work (names the flag or key).
    """
    out = Path(out)
    files = input_files(source)
    staging = out.parent / f".{out.name}.staging"
    real_time = mapping.timestamp is not None and not any(
        file_format(f, options.input_format) is InputFormat.SEQUENCE for f in files
    )
    if options.split.protocol is SplitProtocol.TEMPORAL and not real_time:
        raise ValueError(
            "--split temporal needs event times: name the timestamp column (--timestamp-column "
            "or the mapping's timestamp); the sequence format has only an order"
        )
    fingerprint = _fingerprint(files, mapping, options)
    if stage is Stage.PARTITION:
        state = load_state(staging, mapping, fingerprint)
        if partition is None or not 0 <= partition < state.log.spill.partitions:
            raise ValueError(
                f"--partition must be one of 0 .. {state.log.spill.partitions - 1}, got {partition}"
            )
        _partition_stage(
            staging, state, _row_sources(state, _sides(state, options), options), partition
        )
        return None
    if stage is Stage.MERGE:
        state = load_state(staging, mapping, fingerprint)
        manifest = _merge_stage(staging, state, _sides(state, options), options)
        _swap_into_place(staging, out)
    else:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            state = _global_stage(files, staging, mapping, options, real_time, fingerprint)
            if stage is Stage.GLOBAL:
                return None
            sides = _sides(state, options)  # the side tables are read once in this process
            sources = _row_sources(state, sides, options)
            for p in range(state.log.spill.partitions):
                _partition_stage(staging, state, sources, p)
            manifest = _merge_stage(staging, state, sides, options)
            _swap_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("wrote %s: %s", out, {name: info.rows for name, info in manifest.splits.items()})
    return Manifest.load(out)


def _fingerprint(
    files: list[Path], mapping: EventMapping, options: EventsOptions
) -> dict[str, Any]:
    return {
        "files": [[str(f), f.stat().st_size] for f in files],
        "mapping": _source(files, mapping, checksums=False)["mapping"],
        **options.fingerprint(),
    }


def _swap_into_place(staging: Path, out: Path) -> None:
    shutil.rmtree(staging / SPILL, ignore_errors=True)
    shutil.rmtree(staging / PARTS, ignore_errors=True)
    previous = out.parent / f".{out.name}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


def _global_stage(
    files: list[Path],
    staging: Path,
    mapping: EventMapping,
    options: EventsOptions,
    real_time: bool,
    fingerprint: dict[str, Any],
) -> GlobalState:
    """Passes 1-5 (module docstring), saved to ``staging``."""
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
            staging / SPILL,
            mapping.labels,
            len(log.items),
            thresholds.valid_start if thresholds is not None else None,
        )
    state = GlobalState(
        log,
        counts,
        user_events,
        thresholds,
        counters,
        real_time,
        _source(files, mapping),
        fingerprint,
    )
    save_state(staging, state)
    return state


@dataclass
class _Sides:
    user: SideTableFeatures
    item: SideTableFeatures


def _sides(state: GlobalState, options: EventsOptions) -> _Sides:
    mapping, log = state.log.mapping, state.log
    return _Sides(
        side_table_features(mapping.users, Side.USER, log.users, options.text),
        side_table_features(mapping.items, Side.ITEM, log.items, options.text),
    )


def _row_sources(state: GlobalState, sides: _Sides, options: EventsOptions) -> RowSources:
    schema = event_schema(
        state.log.mapping, sides.user, sides.item, state.real_time, state.counters
    )
    return RowSources(
        schema,
        sides.user,
        sides.item,
        state.thresholds,
        state.counters,
        options.history_length,
        options.chunk_rows,
        options.row_group_rows,
        options.rows_per_file,
    )


def _part_folder(staging: Path, partition: int) -> Path:
    return staging / PARTS / f"{partition:05d}"


def _partition_stage(staging: Path, state: GlobalState, sources: RowSources, p: int) -> None:
    """Partition ``p``'s rows into ``parts/<p>/``, finished by its ``splits.json``."""
    folder = _part_folder(staging, p)
    shutil.rmtree(folder, ignore_errors=True)
    sizes = _split_sizes(state.counts, state.user_events, state.thresholds)
    splits = write_partition(folder, p, state.log, sources, sizes)
    record = {name: [asdict(f) for f in info.files] for name, info in splits.items()}
    (folder / "splits.json").write_text(json.dumps(record))


def _merge_stage(
    staging: Path, state: GlobalState, sides: _Sides, options: EventsOptions
) -> Manifest:
    """Every partition's files into ``<split>/``, in partition order; side tables; manifest."""
    missing = [
        p
        for p in range(state.log.spill.partitions)
        if not (_part_folder(staging, p) / "splits.json").exists()
    ]
    if missing:
        raise FileNotFoundError(f"{staging / PARTS}: partition(s) {missing} have not finished")
    splits = {name: SplitInfo() for name in SPLIT_NAMES}
    for p in range(state.log.spill.partitions):
        folder = _part_folder(staging, p)
        record = json.loads((folder / "splits.json").read_text())
        for name in SPLIT_NAMES:
            for entry in record[name]:
                moved = f"{name}/part-{len(splits[name].files):05d}.parquet"
                (staging / name).mkdir(exist_ok=True)
                (folder / entry["path"]).rename(staging / moved)
                splits[name].files.append(ShardFile(**{**entry, "path": moved}))
    sources = _row_sources(state, sides, options)
    splits["users"] = write_side_table(
        staging, sources.schema, Side.USER, sides.user.features.columns, options.row_group_rows
    )
    counters = state.counters
    item_columns = {**sides.item.features.columns, **(counters.snapshot if counters else {})}
    splits["items"] = write_side_table(
        staging, sources.schema, Side.ITEM, item_columns, options.row_group_rows
    )
    log = state.log
    extra = _extra(state, splits, sides)
    if counters is not None:
        extra["counters"] = counters.to_manifest(log.mapping.labels)
    manifest = Manifest(
        dataset=DATASET,
        schema=sources.schema,
        tables=_tables(sides.user, sides.item, state.real_time, counters, options),
        splits=splits,
        history_length=options.history_length,
        source=state.source,
        extra=extra,
        counters=counters.statistics if counters is not None else {},
    )
    for name in ("state.json", "state.npz"):
        (staging / name).unlink()
    manifest.save(staging)
    return manifest


def _spilled_log(
    files: list[Path], staging: Path, mapping: EventMapping, options: EventsOptions
) -> SpilledLog:
    """Passes 1-3 (module docstring)."""
    distinct_users, distinct_items, events = DistinctIds(), DistinctIds(), 0
    for chunk in event_chunks(files, mapping, options.input_format, options.chunk_rows):
        distinct_users.add(chunk.user)
        distinct_items.add(chunk.item)
        events += chunk.rows
    if events == 0:
        raise SchemaError(f"{[str(f) for f in files]}: no events")
    users, items = distinct_users.id_map(), distinct_items.id_map()
    partitions = options.partitions or partitions_for(events, options.partition_events)
    labels = mapping.label_names()
    with PartitionSpill.of_events(staging / SPILL / "events", partitions, labels) as spill:
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
    provisional = SpilledLog(
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
    return SpilledLog(
        spill, mapping, kept_users, kept_items, user_new, item_new, events, core.iterations
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


def _source(files: list[Path], mapping: EventMapping, checksums: bool = True) -> dict[str, Any]:
    return {
        "kind": DATASET,
        "files": {str(f): sha256_file(f) if checksums else None for f in files},
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


def _extra(state: GlobalState, splits: dict[str, SplitInfo], sides: _Sides) -> dict[str, Any]:
    """``manifest.extra``: counts, k-core, dedup, id ranges, order, split rule, raw-id files,
    vocabularies and text records."""
    log, counts, thresholds = state.log, state.counts, state.thresholds
    user_events, user_side, item_side = state.user_events, sides.user, sides.item
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
        "raw_ids": state.raw_ids,
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
