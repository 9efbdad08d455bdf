"""MovieLens feature breadth: title tokens, point-in-time counters and time context, checked on
real shards written by the converter against brute-force references."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.counters import DAY
from data_pipeline.datasets.movielens import prepare_movielens
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from data_pipeline.schema import Side
from data_pipeline.text import TextHashConfig, text_ids, unigram_id
from data_pipeline.validation import IdValidator
from tests.data_pipeline.test_movielens import raw_events, write_ml100k

WINDOWS = {"1d": DAY, "7d": 7 * DAY, "30d": 30 * DAY}
KINDS = ("rating", "like")
COUNTERS = [f"item_{k}_count_{w}" for k in KINDS for w in WINDOWS]
BASE = 1_000_000_000  # 2001-09-09 01:46:40 UTC, a Sunday
# Offsets hit each window's boundary exactly (s = t - w counts) and tie on purpose.
OFFSETS = [0, 3600, DAY, DAY + 1, 7 * DAY, 7 * DAY + 5, 30 * DAY, 30 * DAY + 7, 31 * DAY, 45 * DAY]
TITLES = {  # raw item id -> title in the tiny ml-100k u.item
    1: "Toy Story (1995)",
    2: "GoldenEye (1995)",
    3: "Café au lait (1994)",
    4: "unknown",
    5: "Metropolis (1927)",
    6: "Nosferatu (1918)",
}


def spread_log() -> list[tuple[int, int, int, int]]:
    """~60 ratings of 6 items by 12 users over 45 days, many on window boundaries and ties."""
    rng = np.random.default_rng(7)
    data = []
    for user in range(1, 13):
        for item in rng.choice(np.arange(1, 7), size=5, replace=False):
            offset = int(rng.choice(OFFSETS)) + int(rng.integers(0, 3)) * 7 * 3600
            data.append((user, int(item), int(rng.integers(1, 6)), BASE + offset))
    return data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, list]:
    root = tmp_path_factory.mktemp("ml")
    data = spread_log()
    manifest = prepare_movielens("100k", root / "out", write_ml100k(root / "src", data), 3)
    return root / "out", manifest, data


def brute_force_counts(data: list, item: int, t: int, window: int, kind: str) -> int:
    return sum(
        1
        for _, i, rating, s in data
        if i == item and t - window <= s < t and (kind == "rating" or rating >= 4)
    )


def test_event_counters_match_brute_force_in_every_split(prepared) -> None:  # type: ignore[no-untyped-def]
    out, _, data = prepared
    events = raw_events(out)
    assert {r["split"] for r in events} == {"train", "valid", "test"}
    nonzero = 0
    for row in events:
        for kind in KINDS:
            for window, seconds in WINDOWS.items():
                expected = brute_force_counts(
                    data, row["raw_item"], row["timestamp"], seconds, kind
                )
                assert row[f"item_{kind}_count_{window}"] == expected, (row, kind, window)
                nonzero += expected > 0
    assert nonzero > 50  # the fixture exercises the windows, not only zeros


def test_items_snapshot_counts_train_events_only(prepared) -> None:  # type: ignore[no-untyped-def]
    out, manifest, data = prepared
    events = raw_events(out)
    train = [r for r in events if r["split"] == "train"]
    at = max(r["timestamp"] for r in train) + 1
    assert manifest.extra["counters"]["snapshot_time"] == at
    assert manifest.extra["counters"]["windows"] == WINDOWS
    raw_items = pq.read_table(out / "raw_ids" / "items.parquet")["raw_item_id"].to_pylist()
    train_data = [(r["raw_user"], r["raw_item"], r["label_like"], r["timestamp"]) for r in train]
    leaks = 0
    for item in pq.read_table(out / "items").to_pylist():
        raw = raw_items[item["item_id"]]
        for kind in KINDS:
            for window, seconds in WINDOWS.items():
                # label_like is 1.0 exactly when the rating is >= 4.
                expected = sum(
                    1
                    for _, i, like, s in train_data
                    if i == raw and at - seconds <= s < at and (kind == "rating" or like)
                )
                assert item[f"item_{kind}_count_{window}"] == expected
                leaks += brute_force_counts(data, raw, at, seconds, kind) != expected
    assert leaks > 0  # held-out events fall inside the windows: counting them would differ


def test_manifest_counter_statistics_fit_train_rows(prepared) -> None:  # type: ignore[no-untyped-def]
    out, manifest, _ = prepared
    train = pq.read_table(out / "train")
    assert sorted(manifest.counters) == sorted(COUNTERS)
    for name in COUNTERS:
        values = np.log1p(train[name].to_numpy().astype(np.float64))
        stats = manifest.counters[name]
        assert stats["count"] == train.num_rows
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["std"] == pytest.approx(values.std())
        assert manifest.tables[name] == 24
    assert Manifest.load(out).counters == manifest.counters


def test_title_tokens_and_idf_weights(prepared) -> None:  # type: ignore[no-untyped-def]
    out, manifest, _ = prepared
    config = TextHashConfig(vocab_size=1 << 15, max_tokens=16, bigrams=True)
    assert manifest.tables["text_tokens"] == 1 << 15
    text = manifest.extra["text"]
    assert (text["vocab_size"], text["max_tokens"], text["bigrams"]) == (1 << 15, 16, True)
    # toy, story, toy story, goldeneye, café, au, lait, 2 bigrams, unknown, metropolis, nosferatu
    assert text["distinct_keys"] == 12 and 0 <= text["expected_collisions"] < 0.01
    raw_items = pq.read_table(out / "raw_ids" / "items.parquet")["raw_item_id"].to_pylist()
    items = pq.read_table(out / "items").to_pylist()
    stripped = {raw: title.rsplit(" (", 1)[0] for raw, title in TITLES.items()}
    assert stripped[3] == "Café au lait"
    document_frequency: dict[int, int] = {}
    for title in stripped.values():
        for token in set(text_ids(title, config)):
            document_frequency[token] = document_frequency.get(token, 0) + 1
    for item in items:
        raw = raw_items[item["item_id"]]
        assert item["item_title_tokens"] == text_ids(stripped[raw], config)
        assert unigram_id("1995", config.vocab_size) not in item["item_title_tokens"]
        expected = [
            math.log((1 + len(items)) / (1 + document_frequency[t])) + 1
            for t in item["item_title_tokens"]
        ]
        assert item["item_title_tokens_weights"] == pytest.approx(expected)
    by_item = {item["item_id"]: item for item in items}
    for row in raw_events(out):  # denormalized into every event row
        source = by_item[row["item_id"]]
        assert row["item_title_tokens"] == source["item_title_tokens"]
        assert row["item_title_tokens_weights"] == source["item_title_tokens_weights"]


def test_non_ascii_titles_and_vocab_size(tmp_path: Path) -> None:
    source = tmp_path / "ml-20m"
    source.mkdir()
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,3.5,20\n2,3,5.0,30\n2,1,1.0,40\n"
    (source / "ratings.csv").write_text(ratings)
    movies = "movieId,title,genres\n"
    movies += '1,"Amélie (Fabuleux destin d\'Amélie Poulain, Le) (2001)",Comedy|Romance\n'
    movies += "2,千と千尋の神隠し (2001),Animation\n"
    movies += "3,Straße (1990),Drama\n"
    (source / "movies.csv").write_text(movies, encoding="utf-8")
    manifest = prepare_movielens(
        "20m", tmp_path / "out", source, 3, text_vocab_size=97, text_max_tokens=3
    )
    config = TextHashConfig(vocab_size=97, max_tokens=3, bigrams=True)
    assert manifest.tables["text_tokens"] == 97
    items = pq.read_table(tmp_path / "out" / "items").to_pylist()
    expected = ["Amélie (Fabuleux destin d'Amélie Poulain, Le)", "千と千尋の神隠し", "Straße"]
    for item, title in zip(items, expected, strict=True):
        assert item["item_title_tokens"] == text_ids(title, config)
        assert len(item["item_title_tokens_weights"]) == len(item["item_title_tokens"])
        assert all(1 <= token < 97 for token in item["item_title_tokens"])
    assert len(items[0]["item_title_tokens"]) == 3 + 2  # max_tokens unigrams + bigrams
    assert items[2]["item_title_tokens"] == text_ids("strasse", config)


def test_time_context_columns(prepared) -> None:  # type: ignore[no-untyped-def]
    out, manifest, _ = prepared
    events = raw_events(out)
    hours = set()
    for row in events:
        moment = datetime.fromtimestamp(row["timestamp"], UTC)
        assert row["ctx_hour"] == moment.hour
        assert row["ctx_weekday"] == moment.weekday()
        hours.add(row["ctx_hour"])
    assert len(hours) > 1
    assert manifest.tables["ctx_hour"] == 24 and manifest.tables["ctx_weekday"] == 7
    users = pq.read_table(out / "users")
    assert "ctx_hour" not in users.column_names and "ctx_weekday" not in users.column_names


def test_shards_validate_against_the_schema(prepared) -> None:  # type: ignore[no-untyped-def]
    out, _, _ = prepared
    manifest = Manifest.load(out)
    schema = manifest.schema
    validator = IdValidator(schema, manifest.tables)
    expected = {
        "train": schema.event_arrow_schema(),
        "valid": schema.event_arrow_schema(),
        "test": schema.event_arrow_schema(),
        "items": schema.side_arrow_schema(Side.ITEM),
        "users": schema.side_arrow_schema(Side.USER),
    }
    for split, arrow_schema in expected.items():
        manifest.verify_checksums(out, split)
        paths = manifest.split_paths(out, split)
        for path in paths:
            assert pq.read_schema(path).names == arrow_schema.names, split
        for unit in list_work_units(paths, arrow_schema):
            validator(read_unit(unit, None), unit.path, unit.row_group)  # ids in range
    features = {f.name: f for f in schema.features}
    assert features["item_title_tokens"].weighted
    assert features["item_title_tokens"].table == "text_tokens"
    assert features["ctx_hour"].per_event and features["ctx_hour"].side is Side.USER
    assert all(features[name].kind.value == "counter" for name in COUNTERS)


def test_output_is_deterministic(tmp_path: Path) -> None:
    source = write_ml100k(tmp_path / "src", spread_log())
    first = prepare_movielens("100k", tmp_path / "a", source, 3)
    second = prepare_movielens("100k", tmp_path / "b", source, 3)
    assert first.to_json()["splits"] == second.to_json()["splits"]
    assert first.counters == second.counters and first.extra == second.extra
