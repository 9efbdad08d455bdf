"""Prepare-time cost of the extra feature kinds (counters, title text, time context) per 10^6 events,
side by side with what prepare already does per event, in one run.

    OMP_NUM_THREADS=1 python -m bench.feature_prepare [--events 1000000] [--items 50000]
        [--users N] [--repeats 3]

On a generated log (items Zipf-distributed, timestamps over 180 days in time order, like-flags
~50%, ~6-word titles from a 20k-word vocabulary), each stage is timed best of ``--repeats``:

* baseline: the point-in-time user history (``build_timeline`` + ``history_for_rows``, H = 50,
  in prepare's write chunks) and writing the base columns with ``ShardWriter`` (MovieLens's
  row-group size) into a temporary directory;
* counters: MovieLens's 2 kinds x 3 windows, one shot (what prepare runs) and streamed in 8
  time-ordered chunks (the bounded-memory alternative, checked equal), ``CounterStatistics`` and
  the ``items/`` snapshot;
* text: ``text_id_column`` and ``DocumentFrequency`` + idf weights over the M titles (cost per
  item), then both columns taken into the N event rows (cost per event);
* context: ``time_context`` of the N timestamps;
* writing the new columns alone with the same writer and row groups (Parquet column chunks are
  encoded independently, so this is the extra a full event row costs).

Ratios are to the baseline total; they are what to compare across machines.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from bench.table import print_table
from data_pipeline.counters import CounterStatistics, StreamingCounters, point_in_time_counts
from data_pipeline.datasets.event_features import counter_snapshot, time_context
from data_pipeline.datasets.history import build_timeline, history_for_rows
from data_pipeline.datasets.movielens import (
    CHUNK_ROWS,
    LARGE_ROW_GROUP_ROWS,
    SMALL_DATASET_EVENTS,
    SMALL_ROW_GROUP_ROWS,
)
from data_pipeline.datasets.movielens_counters import COUNTER_WINDOWS
from data_pipeline.schema import (
    HISTORY_ITEMS,
    HISTORY_TIMESTAMPS,
    ITEM_ID,
    TIMESTAMP,
    USER_ID,
    history_action_column,
    label_column,
    weights_column,
)
from data_pipeline.shard_writer import ShardWriter
from data_pipeline.text import DocumentFrequency, TextHashConfig, idf_weight_column, text_id_column

logger = logging.getLogger(__name__)

T = TypeVar("T")
HISTORY_LENGTH = 50
STREAMING_CHUNKS = 8
SPAN_SECONDS = 180 * 86_400
START_TIME = 1_700_000_000
VOCABULARY_WORDS = 20_000
ITEM_ZIPF_EXPONENT = 1.0
# prepare_movielens's defaults: text_vocab_size 1 << 15, text_max_tokens 16, bigrams on.
TEXT_CONFIG = TextHashConfig(vocab_size=1 << 15, max_tokens=16, bigrams=True)
TITLE_TOKENS = "item_title_tokens"
COLUMNS = [
    "stage",
    "seconds",
    "s per 10^6 events",
    "s per 10^6 items",
    "ratio to baseline",
    "Parquet MiB",
]

# One stage run: seconds per part (table rows) and what later stages need.
StageRun = tuple[dict[str, float], T]


@dataclass(frozen=True)
class EventLog:
    """A generated interaction log in time order.

    Args:
        user, item, timestamp: ``[N]`` int64 (``timestamp`` non-decreasing, seconds).
        like: ``[N]`` bool, about half true.
        titles: ``[M]`` item titles indexed by item id.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    like: np.ndarray
    titles: list[str]

    @property
    def num_events(self) -> int:
        return int(self.item.shape[0])

    @property
    def num_items(self) -> int:
        return len(self.titles)


def zipf_probabilities(size: int, exponent: float) -> np.ndarray:
    """``[size]`` probabilities proportional to ``1 / rank**exponent``."""
    weights = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def generate_titles(items: int, rng: np.random.Generator) -> list[str]:
    """``[items]`` titles of 4-8 (mean 6) capitalized words, Zipf-drawn from a 20k vocabulary."""
    lengths = rng.integers(3, 11, size=VOCABULARY_WORDS)
    letters = rng.integers(ord("a"), ord("z") + 1, size=(VOCABULARY_WORDS, 10), dtype=np.uint8)
    vocabulary = [bytes(row[:n]).decode("ascii") for row, n in zip(letters, lengths, strict=True)]
    words_per_title = rng.integers(4, 9, size=items)
    picks = rng.choice(
        VOCABULARY_WORDS,
        size=int(words_per_title.sum()),
        p=zipf_probabilities(VOCABULARY_WORDS, 1.0),
    )
    ends = np.cumsum(words_per_title)
    return [
        " ".join(vocabulary[w] for w in picks[end - n : end]).title()
        for end, n in zip(ends.tolist(), words_per_title.tolist(), strict=True)
    ]


def generate_log(events: int, items: int, users: int, seed: int) -> EventLog:
    rng = np.random.default_rng(seed)
    # Popularity rank -> a random item id, so popular items are not the low ids.
    item_of_rank = rng.permutation(items)
    ranks = rng.choice(items, size=events, p=zipf_probabilities(items, ITEM_ZIPF_EXPONENT))
    return EventLog(
        user=rng.integers(0, users, size=events, dtype=np.int64),
        item=item_of_rank[ranks].astype(np.int64),
        timestamp=np.sort(START_TIME + rng.integers(0, SPAN_SECONDS, size=events, dtype=np.int64)),
        like=rng.random(events) < 0.5,
        titles=generate_titles(items, rng),
    )


def best_of(repeats: int, stage: Callable[[], StageRun[T]]) -> StageRun[T]:
    """The run with the smallest total time of ``repeats`` runs of ``stage``."""
    best: StageRun[T] | None = None
    for _ in range(repeats):
        run = stage()
        if best is None or sum(run[0].values()) < sum(best[0].values()):
            best = run
    assert best is not None
    return best


def timed(function: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def row_group_rows(events: int) -> int:
    """MovieLens prepare's default row-group size for a log of ``events`` events."""
    return SMALL_ROW_GROUP_ROWS if events <= SMALL_DATASET_EVENTS else LARGE_ROW_GROUP_ROWS


def write_chunks(out: Path, tables: Callable[[np.ndarray], pa.Table], events: int) -> float:
    """Write ``tables(rows)`` for prepare's row chunks with ``ShardWriter``; returns the seconds
    spent writing (building the tables is not counted). Files are removed after measuring."""
    seconds = 0.0
    writer: ShardWriter | None = None
    for start in range(0, events, CHUNK_ROWS):
        table = tables(np.arange(start, min(start + CHUNK_ROWS, events), dtype=np.int64))
        begin = time.perf_counter()
        if writer is None:
            writer = ShardWriter(out, "train", table.schema, row_group_rows=row_group_rows(events))
        writer.write(table)
        seconds += time.perf_counter() - begin
    assert writer is not None
    seconds += timed(writer.close)[0]
    return seconds


def parquet_bytes(out: Path) -> int:
    return sum(path.stat().st_size for path in out.rglob("*.parquet"))


def baseline_stage(log: EventLog, tmp: Path) -> StageRun[int]:
    """History (timeline + per-chunk gathers) and the base columns' Parquet write."""
    history_seconds, timeline = timed(lambda: build_timeline(log.user, log.timestamp, log.item))
    actions = {"like": log.like.astype(np.int8)}

    def base_table(rows: np.ndarray) -> pa.Table:
        nonlocal history_seconds
        seconds, history = timed(
            lambda: history_for_rows(
                timeline, log.item, actions, rows, HISTORY_LENGTH, log.timestamp
            )
        )
        history_seconds += seconds
        return pa.table(
            {
                USER_ID: log.user[rows],
                ITEM_ID: log.item[rows],
                TIMESTAMP: log.timestamp[rows],
                label_column("click"): np.ones(len(rows), dtype=np.float32),
                label_column("like"): log.like[rows].astype(np.float32),
                HISTORY_ITEMS: history.item_ids_arrow(),
                history_action_column("like"): history.action_arrow("like"),
                HISTORY_TIMESTAMPS: history.timestamps_arrow(),
            }
        )

    out = tmp / "base"
    write_seconds = write_chunks(out, base_table, log.num_events)
    size = parquet_bytes(out)
    shutil.rmtree(out)
    parts = {
        f"baseline: point-in-time history (H={HISTORY_LENGTH})": history_seconds,
        "baseline: write base columns (ShardWriter)": write_seconds,
    }
    return parts, size


def counter_flags(log: EventLog) -> dict[str, np.ndarray]:
    """MovieLens's kinds: ``rating`` (every event) and ``like``."""
    return {"rating": np.ones(log.num_events, dtype=bool), "like": log.like}


def counters_stage(log: EventLog) -> StageRun[dict[str, np.ndarray]]:
    flags = counter_flags(log)
    one_shot, counts = timed(
        lambda: point_in_time_counts(log.item, log.timestamp, flags, COUNTER_WINDOWS)
    )
    statistics, _ = timed(lambda: CounterStatistics().update(counts).to_manifest())
    snapshot, _ = timed(
        lambda: counter_snapshot(
            log.item,
            log.timestamp,
            flags,
            COUNTER_WINDOWS,
            at=int(log.timestamp[-1]) + 1,
            num_items=log.num_items,
        )
    )
    parts = {
        f"counters: point-in-time, {len(flags)} kinds x {len(COUNTER_WINDOWS)} windows": one_shot,
        "counters: CounterStatistics (log1p mean/std)": statistics,
        "counters: items/ snapshot": snapshot,
    }
    return parts, counts


def streaming_counts(log: EventLog) -> dict[str, np.ndarray]:
    """The counters over ``STREAMING_CHUNKS`` time-ordered chunks, concatenated."""
    flags = counter_flags(log)
    streaming = StreamingCounters(tuple(flags), COUNTER_WINDOWS)
    pieces: list[dict[str, np.ndarray]] = []
    for rows in np.array_split(np.arange(log.num_events), STREAMING_CHUNKS):
        chunk_flags = {kind: values[rows] for kind, values in flags.items()}
        pieces.append(streaming.update(log.item[rows], log.timestamp[rows], chunk_flags))
    return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}


def streaming_stage(log: EventLog) -> StageRun[dict[str, np.ndarray]]:
    seconds, counts = timed(lambda: streaming_counts(log))
    return {f"counters: streaming, {STREAMING_CHUNKS} time-ordered chunks": seconds}, counts


def title_columns(log: EventLog) -> tuple[float, float, dict[str, pa.Array]]:
    """Seconds of hashing and of df + idf over the M titles, and the ``[M]`` item columns."""
    titles = pa.array(log.titles, pa.string())
    hashing, ids = timed(lambda: text_id_column(titles, TEXT_CONFIG))

    def weights() -> pa.Array:
        frequency = DocumentFrequency.empty(TEXT_CONFIG.vocab_size).update(ids)
        return idf_weight_column(ids, frequency.idf())

    idf_seconds, idf = timed(weights)
    return hashing, idf_seconds, {TITLE_TOKENS: ids, weights_column(TITLE_TOKENS): idf}


def text_stage(log: EventLog) -> StageRun[dict[str, pa.Array]]:
    hashing, idf_seconds, item_columns = title_columns(log)
    indices = pa.array(log.item, pa.int64())
    take, event_columns = timed(
        lambda: {name: column.take(indices) for name, column in item_columns.items()}
    )
    parts = {
        "text: title ids, text_id_column": hashing,
        "text: DocumentFrequency + idf weights": idf_seconds,
        "text: denormalize ids + weights to events": take,
    }
    return parts, event_columns


def context_stage(log: EventLog) -> StageRun[dict[str, np.ndarray]]:
    seconds, context = timed(lambda: time_context(log.timestamp))
    return {"context: time_context": seconds}, context


def new_columns_stage(columns: dict[str, Any], events: int, tmp: Path) -> StageRun[int]:
    """Write only the new event columns, chunked and row-grouped like the base columns."""

    def new_table(rows: np.ndarray) -> pa.Table:
        return pa.table(
            {
                name: column.slice(int(rows[0]), len(rows))
                if isinstance(column, pa.Array)
                else column[rows].astype(np.int64)
                for name, column in columns.items()
            }
        )

    out = tmp / "new"
    seconds = write_chunks(out, new_table, events)
    size = parquet_bytes(out)
    shutil.rmtree(out)
    return {"write new columns (ShardWriter)": seconds}, size


PER_ITEM_STAGES = ("text: title ids, text_id_column", "text: DocumentFrequency + idf weights")
STREAMING_ROW = f"counters: streaming, {STREAMING_CHUNKS} time-ordered chunks"


def figure(value: float) -> str:
    """Three significant digits (sub-millisecond stages still show), no exponent above 100."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table_rows(
    parts: dict[str, float], sizes: dict[str, int], events: int, items: int
) -> list[dict[str, Any]]:
    """One row per part, with the baseline's total after its parts and the new features' total
    (one-shot counters, not the streaming alternative) after theirs."""
    baseline = {name: s for name, s in parts.items() if name.startswith("baseline")}
    features = {name: s for name, s in parts.items() if name not in baseline}
    baseline_total = sum(baseline.values())
    new_total = sum(s for name, s in features.items() if name != STREAMING_ROW)
    ordered = {
        **baseline,
        "baseline total": baseline_total,
        **features,
        "new features total (one-shot counters)": new_total,
        "baseline + new features": baseline_total + new_total,
    }
    rows = []
    for name, seconds in ordered.items():
        row = {
            "stage": name,
            "seconds": figure(seconds),
            "s per 10^6 events": figure(seconds * 1e6 / events),
            "ratio to baseline": figure(seconds / baseline_total),
        }
        if name in PER_ITEM_STAGES:
            row["s per 10^6 items"] = figure(seconds * 1e6 / items)
        if name in sizes:
            row["Parquet MiB"] = f"{sizes[name] / 2**20:.2f}"
        rows.append(row)
    return rows


def run(events: int, items: int, users: int, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    logger.info("generating %d events over %d items and %d users", events, items, users)
    log = generate_log(events, items, users, seed)
    with tempfile.TemporaryDirectory(prefix="feature-prepare-bench-") as name:
        tmp = Path(name)
        logger.info("baseline")
        parts, base_bytes = best_of(repeats, lambda: baseline_stage(log, tmp))
        logger.info("counters")
        counter_parts, counts = best_of(repeats, lambda: counters_stage(log))
        streaming_parts, streamed = best_of(repeats, lambda: streaming_stage(log))
        for name, values in counts.items():
            if not np.array_equal(values, streamed[name]):
                raise AssertionError(f"streaming counter {name} differs from the one-shot counts")
        logger.info("text and context")
        text_parts, text = best_of(repeats, lambda: text_stage(log))
        context_parts, context = best_of(repeats, lambda: context_stage(log))
        logger.info("writing the new columns")
        new = {**counts, **context, **text}
        write_parts, new_bytes = best_of(repeats, lambda: new_columns_stage(new, events, tmp))
    parts.update({**counter_parts, **streaming_parts, **text_parts, **context_parts, **write_parts})
    sizes = {
        "baseline: write base columns (ShardWriter)": base_bytes,
        "baseline total": base_bytes,
        "write new columns (ShardWriter)": new_bytes,
        "baseline + new features": base_bytes + new_bytes,
    }
    return table_rows(parts, sizes, events, items)


def machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"machine: {platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} cores ({usable} usable), OMP_NUM_THREADS={threads}, "
        f"numpy {np.__version__}, pyarrow {pa.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=None, help="default: events // 50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    users = args.users if args.users is not None else max(1, args.events // 50)
    for flag, value in (("--events", args.events), ("--items", args.items), ("--users", users)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = run(args.events, args.items, users, args.repeats, args.seed)
    print(machine())
    print(
        f"log: {args.events:,} events, {args.items:,} items (Zipf {ITEM_ZIPF_EXPONENT}), "
        f"{users:,} users, 180 days, likes ~50%; H={HISTORY_LENGTH}, row groups "
        f"{row_group_rows(args.events):,}, text vocab {TEXT_CONFIG.vocab_size:,}; "
        f"best of {args.repeats}"
    )
    print_table(rows, COLUMNS)
    # ru_maxrss is KiB on Linux.
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
