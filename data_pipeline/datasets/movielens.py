"""MovieLens (100k, 1m, 10m, 20m, 25m, 32m) -> twotower event shards.

Every rating is one event with ``label_click = 1`` and ``label_like = rating >= 4``
(:mod:`data_pipeline.datasets.movielens_log`); ``position`` is all null and there is no ranker
score. Each row carries its point-in-time history (:mod:`data_pipeline.datasets.history`) and
its user and item features denormalized, so the trainer needs no join. The split
(:mod:`data_pipeline.datasets.split`, ``split=``) is either

* ``leave-last-out`` (default): per user, the last event is ``test`` and the one before it
  ``valid``; eval rows carry the history up to the held-out event in timeline order; or
* ``temporal``: global cut at event-time quantiles, train ``< T1 <=`` valid ``< T2 <=`` test;
  every valid/test event is a query row (the literature's global temporal protocol) whose
  history holds only its user's events of strictly earlier seconds, on every split's rows.
  ``manifest.extra["split"]`` records the quantiles and ``T1``, ``T2``.

Feature breadth beyond the side files:

* ``item_title_tokens`` (+ ``_weights``): hashed title words and bigrams, idf-weighted, in table
  ``text_tokens`` (:mod:`data_pipeline.datasets.movielens_text`); in event rows and ``items/``.
* ``item_{rating,like}_count_{1d,7d,30d}``: point-in-time item popularity
  (:mod:`data_pipeline.datasets.movielens_counters`). Event rows of every split count the same
  item's events with ``t - w <= s < t`` over the whole log; ``items/`` holds a snapshot over
  train-split events only, at ``max(train timestamp) + 1`` (leave-last-out) or at ``T1``
  (temporal: only events before ``T1``), so the evaluation corpus sees no held-out event;
  ``manifest.counters`` is fitted on train rows. ``users/`` holds static features only.
* ``ctx_hour``, ``ctx_weekday``: UTC hour and weekday of the event, per-event user-side context
  (event rows only, not ``users/``).

Output (``out/``)::

    train/ valid/ test/   events, each split in (timestamp, user_id, item_id) order
    items/ users/         one row per dense id with that side's features
    raw_ids/users.parquet raw_ids/items.parquet   dense id -> raw GroupLens id (+ title)
    manifest.json

Same input, same output bytes: every order is fully determined (ties broken by item id and
input position) and nothing random or time-dependent is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.datasets import movielens_counters
from data_pipeline.datasets.event_features import (
    TEXT_TABLE,
    TIME_CONTEXT_TABLES,
    time_context,
    time_context_specs,
)
from data_pipeline.datasets.history import (
    UserTimeline,
    build_timeline,
    history_for_rows,
    strictly_earlier_rank,
)
from data_pipeline.datasets.movielens_counters import ItemCounters, item_counters
from data_pipeline.datasets.movielens_log import (
    DISLIKE_THRESHOLD,
    LIKE_THRESHOLD,
    MovieLensLog,
    load_log,
    write_raw_ids,
)
from data_pipeline.datasets.movielens_source import ResolvedSource, resolve_source
from data_pipeline.datasets.movielens_text import TitleText, title_spec, title_text
from data_pipeline.datasets.output import clear_output, split_row_group_rows, write_side_table
from data_pipeline.datasets.split import (
    MIN_EVENTS_TO_HOLD_OUT,
    SPLIT_NAMES,
    TRAIN,
    SplitConfig,
    SplitProtocol,
    TemporalThresholds,
    leave_last_out,
    split_user_counts,
    temporal_split,
    temporal_thresholds,
)
from data_pipeline.manifest import Manifest, SplitInfo
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
from data_pipeline.text import TextHashConfig

logger = logging.getLogger(__name__)

LABELS = ("click", "like")
# like: rating >= 4 (explicit approval). dislike: rating <= 2, explicit disapproval: a rated item
# the user did not enjoy tells the encoder what to steer away from, which a click cannot.
HISTORY_ACTIONS = ("like", "dislike")
SMALL_DATASET_EVENTS = 2_000_000
SMALL_ROW_GROUP_ROWS = 8192
LARGE_ROW_GROUP_ROWS = 65_536
CHUNK_ROWS = 262_144


@dataclass(frozen=True)
class EventSources:
    """Everything an event row is built from.

    Args:
        log: the events and side features.
        timeline: per-user order of ``log`` (history).
        title: ``[I]`` title ids and weights, denormalized per row.
        counters: ``[N]`` point-in-time counts per event.
        history_length: H.
        history_rank: ``[N]`` int64 how many of the user's timeline events precede each event's
            history end (:func:`~data_pipeline.datasets.history.history_for_rows` ``earlier``).
    """

    log: MovieLensLog
    timeline: UserTimeline
    title: TitleText
    counters: ItemCounters
    history_length: int
    history_rank: np.ndarray


@dataclass(frozen=True)
class SplitAssignment:
    """Which split every event is in, and what its history may hold.

    Args:
        codes: ``[N]`` int8 split code per event (:data:`~data_pipeline.datasets.split.TRAIN` ..).
        history_rank: ``[N]`` int64, the ``earlier`` of each event's history.
        thresholds: T1 and T2 of the temporal split; None for leave-last-out.
    """

    codes: np.ndarray
    history_rank: np.ndarray
    thresholds: TemporalThresholds | None


def assign_splits(
    log: MovieLensLog, timeline: UserTimeline, config: SplitConfig
) -> SplitAssignment:
    """Leave-last-out (history: every earlier event in timeline order) or temporal (history:
    events of strictly earlier seconds, so a same-second sibling never shows)."""
    if config.protocol is SplitProtocol.LEAVE_LAST_OUT:
        return SplitAssignment(leave_last_out(timeline), timeline.rank, None)
    thresholds = temporal_thresholds(log.timestamp, config.valid_quantile, config.test_quantile)
    return SplitAssignment(
        codes=temporal_split(log.timestamp, thresholds),
        history_rank=strictly_earlier_rank(timeline, log.timestamp),
        thresholds=thresholds,
    )


def prepare_movielens(
    variant: str,
    out: Path,
    source: Path | None = None,
    history_length: int = 50,
    *,
    cache_dir: Path | None = None,
    allow_download: bool = True,
    row_group_rows: int | None = None,
    rows_per_file: int = 1_000_000,
    text_vocab_size: int = 1 << 15,
    text_max_tokens: int = 16,
    split: SplitConfig | None = None,
) -> Manifest:
    """Convert one MovieLens variant into ``out`` and return its manifest.

    Args:
        variant: ``100k``, ``1m``, ``10m``, ``20m``, ``25m`` or ``32m`` (``ml-`` prefix allowed).
        out: dataset directory to (re)write.
        source: a GroupLens zip or folder; None to use the cache, the download URL or, for
            100k, the copy inside the recbole wheel (see ``movielens_source``).
        history_length: H, the most history events kept per row.
        cache_dir: where downloads are kept (default ``$TWOTOWER_CACHE`` or
            ``~/.cache/twotower``).
        allow_download: False skips the GroupLens URL.
        row_group_rows: Parquet row-group size (the reader's unit of work); default 8192 up to
            2M events (so 2 ranks × 2 workers get several units each), else 65536. Smaller
            splits (valid/test) get smaller groups so that each has at least 8.
        rows_per_file: rows per Parquet file.
        text_vocab_size: rows of the ``text_tokens`` table (title ids lie in ``[1, size)``).
        text_max_tokens: title words kept (unigrams; bigrams are on).
        split: leave-last-out (default) or temporal, with its quantiles.
    """
    variant = variant.lower().removeprefix("ml-")
    out = Path(out)
    text_config = TextHashConfig(text_vocab_size, text_max_tokens, bigrams=True)
    resolved, log = _load_source(variant, source, cache_dir, allow_download)
    row_group_rows = _row_group_rows(row_group_rows, int(log.user.shape[0]))
    schema = movielens_schema(log)
    clear_output(out, extra_dirs=("raw_ids",))
    split_config = split if split is not None else SplitConfig()
    sources, assignment = event_sources(log, split_config, text_config, history_length)
    splits = _write_event_splits(
        out, sources, assignment.codes, schema, row_group_rows, rows_per_file
    )
    splits.update(_write_side_tables(out, schema, sources, row_group_rows))
    manifest = Manifest(
        dataset=f"movielens-{variant}",
        schema=schema,
        tables=_table_sizes(log, text_config),
        splits=splits,
        history_length=history_length,
        source=resolved.to_json(),
        extra=_manifest_extra(sources, assignment, splits, write_raw_ids(out, log)),
        counters=sources.counters.statistics,
    )
    manifest.save(out)
    logger.info("wrote %s: %s", out, {name: info.rows for name, info in splits.items()})
    return manifest


def _load_source(
    variant: str, source: Path | None, cache_dir: Path | None, allow_download: bool
) -> tuple[ResolvedSource, MovieLensLog]:
    """Find the variant's raw files (logging where from) and parse them into a dense-id log."""
    resolved = resolve_source(variant, source, cache_dir=cache_dir, allow_download=allow_download)
    logger.info(
        "MovieLens %s source: %s %s (%s layout)",
        variant,
        resolved.kind,
        resolved.location,
        resolved.files.layout,
    )
    return resolved, load_log(resolved)


def _row_group_rows(requested: int | None, events: int) -> int:
    """``requested``, or by default 8192 up to 2M events and 65536 beyond."""
    if requested is not None:
        return requested
    return SMALL_ROW_GROUP_ROWS if events <= SMALL_DATASET_EVENTS else LARGE_ROW_GROUP_ROWS


def event_sources(
    log: MovieLensLog, split: SplitConfig, text_config: TextHashConfig, history_length: int
) -> tuple[EventSources, SplitAssignment]:
    """The split of every event, and what its row is built from: the timeline, the title text
    and the point-in-time counters (whose ``items/`` snapshot sees train events only)."""
    timeline = build_timeline(log.user, log.timestamp, log.item)
    assignment = assign_splits(log, timeline, split)
    thresholds = assignment.thresholds
    sources = EventSources(
        log=log,
        timeline=timeline,
        title=title_text(log.item_titles, text_config),
        counters=item_counters(
            log.item,
            log.timestamp,
            log.like,
            assignment.codes == TRAIN,
            int(log.item_map.shape[0]),
            snapshot_time=thresholds.valid_start if thresholds is not None else None,
        ),
        history_length=history_length,
        history_rank=assignment.history_rank,
    )
    return sources, assignment


def _write_event_splits(
    out: Path,
    sources: EventSources,
    codes: np.ndarray,
    schema: EventSchema,
    row_group_rows: int,
    rows_per_file: int,
) -> dict[str, SplitInfo]:
    """``train/``, ``valid/`` and ``test/`` (``codes``: [N] int8 split code per event), each in
    (timestamp, user_id, item_id) order."""
    log = sources.log
    output_order = np.lexsort((log.item, log.user, log.timestamp))
    splits: dict[str, SplitInfo] = {}
    for code, name in enumerate(SPLIT_NAMES):
        rows = output_order[codes[output_order] == code]
        splits[name] = _write_events(
            out, name, sources, rows, schema, row_group_rows, rows_per_file
        )
    return splits


def _write_side_tables(
    out: Path, schema: EventSchema, sources: EventSources, row_group_rows: int
) -> dict[str, SplitInfo]:
    """``users/`` (static user features) and ``items/`` (static features, title text and the
    train-only counter snapshot)."""
    log = sources.log
    item_columns = {**log.items.columns, **sources.title.columns(), **sources.counters.snapshot}
    return {
        "users": write_side_table(out, schema, Side.USER, log.users.columns, row_group_rows),
        "items": write_side_table(out, schema, Side.ITEM, item_columns, row_group_rows),
    }


def _table_sizes(log: MovieLensLog, text_config: TextHashConfig) -> dict[str, int]:
    return {
        **log.users.table_sizes,
        **TIME_CONTEXT_TABLES,
        **log.items.table_sizes,
        TEXT_TABLE: text_config.vocab_size,
        **movielens_counters.table_sizes(),
    }


def movielens_schema(log: MovieLensLog) -> EventSchema:
    """User features (whatever the release has), the shared-table history, time context, item
    features, title text and popularity counters."""
    user_specs = [FeatureSpec(name, Side.USER, FeatureKind.ID, name) for name in log.users.columns]
    history = FeatureSpec(HISTORY_ITEMS, Side.USER, FeatureKind.IDS, ITEM_ID)
    item_specs = [
        FeatureSpec(
            name,
            Side.ITEM,
            FeatureKind.ID if isinstance(column, np.ndarray) else FeatureKind.IDS,
            name,
        )
        for name, column in log.items.columns.items()
    ]
    return EventSchema(
        features=(
            *user_specs,
            history,
            *time_context_specs(),
            *item_specs,
            title_spec(),
            *movielens_counters.counter_specs(),
        ),
        labels=LABELS,
        history_actions=HISTORY_ACTIONS,
        has_position=True,
        has_ranker_score=False,
        has_history_timestamps=True,
    )


def event_table(sources: EventSources, rows: np.ndarray) -> pa.Table:
    """The event rows ``rows`` ([R] input indices) with labels, features and history."""
    log = sources.log
    actions = {"like": log.like, "dislike": log.dislike}
    history = history_for_rows(
        sources.timeline,
        log.item,
        actions,
        rows,
        sources.history_length,
        log.timestamp,
        earlier=sources.history_rank,
    )
    n = int(rows.shape[0])
    user, item, timestamp = log.user[rows], log.item[rows], log.timestamp[rows]
    columns: dict[str, Any] = {
        USER_ID: user,
        ITEM_ID: item,
        TIMESTAMP: timestamp,
        POSITION: pa.nulls(n, pa.int32()),
        label_column("click"): np.ones(n, dtype=np.float32),
        label_column("like"): log.like[rows].astype(np.float32),
        HISTORY_ITEMS: history.item_ids_arrow(),
        **{history_action_column(a): history.action_arrow(a) for a in HISTORY_ACTIONS},
        HISTORY_TIMESTAMPS: history.timestamps_arrow(),
    }
    taken_columns = (
        log.users.take(user),
        time_context(timestamp),
        log.items.take(item),
        sources.title.take(item),
        sources.counters.take(rows),
    )
    for taken in taken_columns:
        columns.update({k: v for k, v in taken.items() if k not in columns})
    return pa.table(columns)


def _write_events(
    out: Path,
    split: str,
    sources: EventSources,
    rows: np.ndarray,
    schema: EventSchema,
    row_group_rows: int,
    rows_per_file: int,
) -> SplitInfo:
    arrow_schema = schema.event_arrow_schema()
    group_rows = split_row_group_rows(int(rows.shape[0]), row_group_rows)
    with ShardWriter(out, split, arrow_schema, rows_per_file, group_rows) as writer:
        for start in range(0, int(rows.shape[0]), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            writer.write(event_table(sources, chunk))
    return writer.info


def _manifest_extra(
    sources: EventSources,
    assignment: SplitAssignment,
    splits: dict[str, SplitInfo],
    raw_ids: dict[str, dict[str, str]],
) -> dict[str, object]:
    """``manifest.extra``: counts, id ranges, thresholds, order and split rules (the temporal
    split's when it is one), vocabularies, raw-id files, title text and counter records."""
    log, thresholds = sources.log, assignment.thresholds
    n_users, n_items = int(log.user_map.shape[0]), int(log.item_map.shape[0])
    counts = _event_counts(log, splits)
    eligible = sources.timeline.user_event_count >= MIN_EVENTS_TO_HOLD_OUT
    held_out_users = int(np.unique(log.user[eligible]).size)
    counts["users_without_holdout"] = counts["users_with_events"] - held_out_users
    extra: dict[str, object] = {
        "counts": counts,
        "id_ranges": {
            "user_id": [0, n_users - 1],
            "item_id": [0, n_items - 1],
            "timestamp": [int(log.timestamp.min()), int(log.timestamp.max())],
        },
        "like_threshold": LIKE_THRESHOLD,
        "dislike_threshold": DISLIKE_THRESHOLD,
        "event_order": (
            "history: per user by (timestamp, item_id, input position); "
            "shards: by (timestamp, user_id, item_id)"
        ),
        "split_rule": (
            "leave-last-out per user; users with fewer than "
            f"{MIN_EVENTS_TO_HOLD_OUT} events are train only"
        ),
        "vocabularies": {**log.users.vocabularies, **log.items.vocabularies},
        "raw_ids": raw_ids,
    }
    if thresholds is not None:
        extra = _with_temporal_split(extra, log, splits, assignment.codes, thresholds)
    extra["text"] = sources.title.to_manifest()
    extra["counters"] = sources.counters.to_manifest()
    return extra


def _event_counts(log: MovieLensLog, splits: dict[str, SplitInfo]) -> dict[str, int]:
    return {
        "events": int(log.user.shape[0]),
        "users": int(log.user_map.shape[0]),
        "items": int(log.item_map.shape[0]),
        "users_with_events": int(np.unique(log.user).size),
        "items_with_events": int(np.unique(log.item).size),
        **{f"{name}_rows": info.rows for name, info in splits.items()},
    }


def _with_temporal_split(
    extra: dict[str, object],
    log: MovieLensLog,
    splits: dict[str, SplitInfo],
    codes: np.ndarray,
    thresholds: TemporalThresholds,
) -> dict[str, object]:
    """``extra`` with the temporal split's ``split``, ``split_rule`` and per-split user counts
    (leave-last-out's ``users_without_holdout`` has no meaning here)."""
    split = thresholds.to_manifest("event timestamps")
    split["history"] = "the user's events with timestamp < the row's timestamp, every split"
    return {
        **extra,
        "counts": _event_counts(log, splits) | split_user_counts(log.user, codes),
        "split": split,
        "split_rule": thresholds.rule_text("event-time"),
    }
