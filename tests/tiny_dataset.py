"""A tiny prepared dataset written with the real writer, for fast unit and distributed tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.counters import CounterStatistics, counter_name, point_in_time_counts
from data_pipeline.datasets.event_features import (
    COUNTER_BUCKETS,
    TEXT_TABLE,
    context_spec,
    counter_spec,
    text_spec,
    time_context,
)
from data_pipeline.manifest import Manifest, ShardFile, sha256_file
from data_pipeline.schema import (
    EventSchema,
    FeatureGroup,
    FeatureKind,
    FeatureSpec,
    Side,
    weights_column,
)
from data_pipeline.shard_writer import ShardWriter
from data_pipeline.text import (
    DocumentFrequency,
    TextHashConfig,
    idf_weight_column,
    text_id_column,
)

USERS, ITEMS, CATEGORIES = 40, 60, 5

# A small model and batch for the tiny dataset: the overrides runs in tests share.
TINY_MODEL = [
    "model.embedding_dim=16",
    "model.user_mlp=[32]",
    "model.item_mlp=[32]",
    "model.output_dim=16",
    "data.batch_size=32",
    "data.eval_batch_size=16",
    "train.progress_bar=false",
    "logging.wandb=false",
]

SCHEMA = EventSchema(
    features=(
        FeatureSpec("user_id", Side.USER, FeatureKind.ID, "user_id"),
        FeatureSpec("user_segment", Side.USER, FeatureKind.ID, "user_segment"),
        FeatureSpec("hist_item_ids", Side.USER, FeatureKind.IDS, "item_id"),
        FeatureSpec("item_id", Side.ITEM, FeatureKind.ID, "item_id"),
        FeatureSpec("item_tags", Side.ITEM, FeatureKind.IDS, "item_tags"),
    ),
    labels=("click", "like"),
    history_actions=("like",),
    has_position=True,
)
TABLES = {"user_id": USERS, "user_segment": 3, "item_id": ITEMS, "item_tags": CATEGORIES}


def _impression_negatives(rng: np.random.Generator, items: np.ndarray) -> pa.Array:
    """0-3 items per row "shown with" the row's item and not engaged (never the item itself)."""
    lengths = rng.integers(0, 4, len(items))
    lists = [[(int(i) + 1 + 3 * j) % ITEMS for j in range(n)] for i, n in zip(items, lengths)]
    return pa.array(lists, pa.list_(pa.int64()))


def _history_times(table: pa.Table) -> pa.Array:
    """One history entry per hour before the event, newest first."""
    lengths = table.column("hist_item_ids").to_pylist()
    now = table.column("timestamp").to_pylist()
    return pa.array(
        [[t - 3600 * (j + 1) for j in range(len(h))] for t, h in zip(now, lengths)],
        pa.list_(pa.int64()),
    )


def _events(rng: np.random.Generator, rows: int, start: int) -> pa.Table:
    users = rng.integers(0, USERS, rows)
    items = (users * 7 + rng.integers(0, 5, rows)) % ITEMS  # learnable user -> item structure
    lengths = rng.integers(0, 6, rows)
    hist = [list(rng.integers(0, ITEMS, n)) for n in lengths]
    return pa.table(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": np.arange(start, start + rows),
            "position": pa.array(rng.integers(0, 10, rows), pa.int32()),
            "label_click": np.ones(rows, np.float32),
            "label_like": (rng.random(rows) < 0.5).astype(np.float32),
            "user_segment": users % 3,
            "hist_item_ids": pa.array(hist, pa.list_(pa.int64())),
            "item_tags": pa.array([[i % CATEGORIES, (i + 1) % CATEGORIES] for i in items]),
            "hist_like": pa.array([[1] * n for n in lengths], pa.list_(pa.int8())),
        }
    )


# Every feature kind beyond ids and categories, written with the real prepare-time helpers.
TEXT = TextHashConfig(vocab_size=64, max_tokens=4, bigrams=True)
VIEWS = counter_name("view", "1h")
ALL_KINDS = (
    text_spec("item_text_tokens", Side.ITEM),
    counter_spec(VIEWS),
    context_spec("ctx_hour"),
    text_spec("search_query_tokens", Side.USER, per_event=True),
    FeatureSpec(
        "user_topic_affinity", Side.USER, FeatureKind.IDS, "topic", FeatureGroup.AFFINITY, True
    ),
)
ALL_KINDS_TABLES = {TEXT_TABLE: 64, VIEWS: COUNTER_BUCKETS, "ctx_hour": 24, "topic": 4}
_WORDS = ("red", "blue", "fast", "slow", "café", "北京", "night", "day")


def _item_text(item: int) -> str:
    return " ".join(_WORDS[(item * k + k) % len(_WORDS)] for k in range(1, 4))


def _text_columns(name: str, texts: list[str]) -> dict[str, pa.Array]:
    ids = text_id_column(pa.array(texts, pa.string()), TEXT)
    idf = DocumentFrequency.empty(TEXT.vocab_size).update(ids).idf()
    return {name: ids, weights_column(name): idf_weight_column(ids, idf)}


def _affinity(users: np.ndarray) -> dict[str, pa.Array]:
    ids = pa.array([[int(u) % 4, (int(u) + 1) % 4] for u in users], pa.list_(pa.int64()))
    weights = pa.array([[0.75, 0.25] for _ in users], pa.list_(pa.float32()))
    return {"user_topic_affinity": ids, weights_column("user_topic_affinity"): weights}


def _all_kinds_columns(table: pa.Table, views: np.ndarray) -> pa.Table:
    items = table.column("item_id").to_numpy()
    users = table.column("user_id").to_numpy()
    times = table.column("timestamp").to_numpy() * 60  # a minute apart: 1 h windows vary
    queries = [_item_text(int(u) % ITEMS)[: 3 + int(u) % 9] for u in users]
    columns = {
        **_text_columns("item_text_tokens", [_item_text(int(i)) for i in items]),
        VIEWS: pa.array(views, pa.int64()),
        "ctx_hour": pa.array(time_context(times)["ctx_hour"], pa.int64()),
        **_text_columns("search_query_tokens", queries),
        **_affinity(users),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def write_tiny_dataset(
    root: Path,
    train_rows: int = 640,
    row_group_rows: int = 64,
    seed: int = 0,
    impressions: bool = False,
    history_timestamps: bool = False,
    all_kinds: bool = False,
) -> Path:
    """Writes train/valid/test/items/users + manifest.json under ``root``; returns ``root``.

    ``impressions`` adds the impression hard-negative column to every event split;
    ``history_timestamps`` adds ``hist_timestamps`` (recency features); ``all_kinds`` adds a
    feature of every further kind (:data:`ALL_KINDS`: weighted text, a point-in-time counter,
    context, weighted search tokens sharing the text table, weighted topic affinities)."""
    rng = np.random.default_rng(seed)
    schema = replace(
        SCHEMA,
        features=SCHEMA.features + (ALL_KINDS if all_kinds else ()),
        has_impression_negatives=impressions,
        has_history_timestamps=history_timestamps,
    )
    statistics = CounterStatistics()
    splits = {}
    for split, rows in (("train", train_rows), ("valid", USERS), ("test", USERS)):
        with ShardWriter(
            root,
            split,
            schema.event_arrow_schema(),
            rows_per_file=train_rows // 2,
            row_group_rows=row_group_rows,
        ) as writer:
            table = _events(rng, rows, start=0 if split == "train" else 10**6)
            if split != "train":
                table = table.set_column(0, "user_id", pa.array(np.arange(USERS)))
            if impressions:
                negatives = _impression_negatives(rng, table.column("item_id").to_numpy())
                table = table.append_column("impression_negative_ids", negatives)
            if history_timestamps:
                table = table.append_column("hist_timestamps", _history_times(table))
            if all_kinds:
                counts = point_in_time_counts(
                    table.column("item_id").to_numpy(),
                    table.column("timestamp").to_numpy() * 60,
                    {"view": np.ones(table.num_rows, bool)},
                    {"1h": 3600},
                )[VIEWS]
                if split == "train":
                    statistics.update({VIEWS: counts})
                table = _all_kinds_columns(table, counts)
            table = table.select(schema.event_arrow_schema().names)
            writer.write(table)
        splits[split] = writer.info
    items = pa.table(
        {
            "item_id": np.arange(ITEMS),
            "item_tags": pa.array([[i % CATEGORIES, (i + 1) % CATEGORIES] for i in range(ITEMS)]),
        }
    )
    users = pa.table({"user_id": np.arange(USERS), "user_segment": np.arange(USERS) % 3})
    if all_kinds:
        for name, column in _text_columns(
            "item_text_tokens", [_item_text(i) for i in range(ITEMS)]
        ).items():
            items = items.append_column(name, column)
        items = items.append_column(VIEWS, pa.array((np.arange(ITEMS) * 5) % 7, pa.int64()))
        for name, column in _affinity(np.arange(USERS)).items():
            users = users.append_column(name, column)
    for split, table, side in (("items", items, Side.ITEM), ("users", users, Side.USER)):
        with ShardWriter(root, split, schema.side_arrow_schema(side), row_group_rows=16) as writer:
            writer.write(table.select(schema.side_arrow_schema(side).names))
        splits[split] = writer.info
    tables = {**TABLES, **(ALL_KINDS_TABLES if all_kinds else {})}
    Manifest(
        "tiny", schema, tables, splits, history_length=5, counters=statistics.to_manifest()
    ).save(root)
    return root


def add_empty_file(root: Path, split: str, row_groups: int = 0) -> Path:
    """Puts a 0-row Parquet file first in event split ``split`` (with no row group, or with
    ``row_groups`` empty ones), listed in the manifest with its checksum; returns its path."""
    manifest = Manifest.load(root)
    path = root / split / "part-empty.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = manifest.schema.event_arrow_schema()
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(row_groups):
            writer.write_table(schema.empty_table())
    assert pq.ParquetFile(path).metadata.num_row_groups == row_groups
    files = manifest.splits[split].files
    files.insert(0, ShardFile(f"{split}/{path.name}", 0, row_groups, sha256_file(path)))
    manifest.save(root)
    return path
