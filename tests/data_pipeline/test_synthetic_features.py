"""Synthetic feature breadth: counters against a brute-force count over the whole impression log,
search tokens against the raw query log, item text tied to topics, context, topic affinities,
schemas, determinism, and the base columns left unchanged."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.counters import CounterStatistics
from data_pipeline.datasets.event_features import time_context
from data_pipeline.datasets.synthetic import prepare_synthetic
from data_pipeline.datasets.synthetic_features import (
    COUNTER_KINDS,
    SyntheticFeatures,
    parse_window,
)
from data_pipeline.datasets.synthetic_topics import TopicConfig
from data_pipeline.datasets.synthetic_world import WorldConfig
from data_pipeline.manifest import Manifest, sha256_file
from data_pipeline.schema import FeatureGroup, Side, validate_arrow_schema, weights_column
from data_pipeline.text import DocumentFrequency, TextHashConfig, text_id_column, text_ids

FEATURES = SyntheticFeatures(counter_windows=("1h", "6h", "1d"), text_vocab_size=1 << 12)
# 600 sessions every 20 minutes: ~8.3 days, so hours, weekdays and every window vary.
WORLD = WorldConfig(session_interval_s=1200)
BASE = {"users": 40, "items": 200, "events": 6000, "seed": 7, "history_length": 5}
RUN = {**BASE, "world": WORLD, "features": FEATURES, "chunk_events": 300, "row_group_rows": 1000}


@pytest.fixture(scope="module")
def full_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """No eval split: every impression is a train row, so the output is the whole log."""
    out = tmp_path_factory.mktemp("full")
    return out, prepare_synthetic(out=out, valid_fraction=0.0, test_fraction=0.0, **RUN)


@pytest.fixture(scope="module", params=[300, 1 << 18], ids=["20-chunks", "one-chunk"])
def any_chunking(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Manifest]:
    """The whole log, written in 20 chunks or in one (the feed itself depends on the chunk size)."""
    out = tmp_path_factory.mktemp("log")
    run = {**RUN, "chunk_events": request.param}
    return out, prepare_synthetic(out=out, valid_fraction=0.0, test_fraction=0.0, **run)


@pytest.fixture(scope="module")
def with_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """The same feed (split fractions do not change it), with eval rows dropped to clicks."""
    out = tmp_path_factory.mktemp("eval")
    return out, prepare_synthetic(out=out, valid_fraction=0.1, test_fraction=0.1, **RUN)


def events(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / s) for s in ("train", "valid", "test")])


def brute_force_counts(
    items: np.ndarray,
    times: np.ndarray,
    flags: dict[str, np.ndarray],
    query_items: np.ndarray,
    query_times: np.ndarray,
) -> dict[str, np.ndarray]:
    """Counters by definition: flagged events of the item with ``t - w <= s < t``."""
    same = query_items[:, None] == items[None, :]
    before = times[None, :] < query_times[:, None]
    out = {}
    for window in FEATURES.counter_windows:
        inside = same & before & (times[None, :] >= query_times[:, None] - parse_window(window))
        for kind in COUNTER_KINDS:
            out[f"item_{kind}_count_{window}"] = (inside & flags[kind][None, :]).sum(axis=1)
    return out


def log_flags(table: pa.Table) -> dict[str, np.ndarray]:
    return {
        "view": np.ones(table.num_rows, dtype=bool),
        "click": table["label_click"].to_numpy() == 1,
        "like": table["label_like"].to_numpy() == 1,
    }


def test_counters_match_brute_force_over_the_log(any_chunking: tuple[Path, Manifest]) -> None:
    """Chunks of 30 sessions (10 hours) or one chunk: streaming counters equal the definition,
    across chunk boundaries too; same-session impressions (one timestamp) never count each other."""
    out, manifest = any_chunking
    log = events(out)
    items, times = log["item_id"].to_numpy(), log["timestamp"].to_numpy()
    expected = brute_force_counts(items, times, log_flags(log), items, times)
    for name, values in expected.items():
        got = log[name].to_numpy()
        np.testing.assert_array_equal(got, values, err_msg=name)
        assert 0 < got.std(), name  # not all equal (not all 0)
    assert set(manifest.counters) == set(FEATURES.counter_names)
    stats = CounterStatistics().update({n: log[n].to_numpy() for n in expected}).to_manifest()
    for name, entry in stats.items():
        assert manifest.counters[name]["count"] == entry["count"] == log.num_rows
        assert manifest.counters[name]["mean"] == pytest.approx(entry["mean"])
        assert manifest.counters[name]["std"] == pytest.approx(entry["std"])


def test_eval_counters_count_dropped_impressions(
    full_log: tuple[Path, Manifest], with_eval: tuple[Path, Manifest]
) -> None:
    full, _ = full_log
    out, manifest = with_eval
    reference = {
        (r["timestamp"], r["position"]): r for r in events(full).to_pylist()
    }  # every impression
    train = pq.read_table(out / "train")
    evaluation = pa.concat_tables([pq.read_table(out / s) for s in ("valid", "test")])
    assert evaluation.num_rows and (evaluation["label_click"].to_numpy() == 1).all()
    for row in events(out).to_pylist():
        expected = reference[row["timestamp"], row["position"]]
        assert row["item_id"] == expected["item_id"]
        for name in FEATURES.counter_names:
            assert row[name] == expected[name], name
    # Statistics over the train rows only.
    stats = CounterStatistics().update({n: train[n].to_numpy() for n in FEATURES.counter_names})
    assert manifest.counters.keys() == stats.to_manifest().keys()
    for name, entry in stats.to_manifest().items():
        assert manifest.counters[name] == pytest.approx(entry)
    # items/: counts as of the last train timestamp + 1, over train impressions only.
    at = int(train["timestamp"].to_numpy().max()) + 1
    train_items, train_times = train["item_id"].to_numpy(), train["timestamp"].to_numpy()
    corpus = pq.read_table(out / "items")
    ids = corpus["item_id"].to_numpy()
    expected = brute_force_counts(
        train_items, train_times, log_flags(train), ids, np.full(len(ids), at)
    )
    for name, values in expected.items():
        np.testing.assert_array_equal(corpus[name].to_numpy(), values, err_msg=name)
    assert corpus["item_view_count_1d"].to_numpy().std() > 0


def test_search_tokens_come_from_earlier_queries(with_eval: tuple[Path, Manifest]) -> None:
    out, manifest = with_eval
    config = TextHashConfig(vocab_size=FEATURES.text_vocab_size)
    raw = manifest.extra["raw"]
    for entry in raw.values():
        assert sha256_file(out / entry["path"]) == entry["sha256"]
    queries = pq.read_table(out / raw["search_queries"]["path"]).to_pylist()
    by_user: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for query in queries:
        by_user[query["user_id"]].append((query["timestamp"], query["query"]))
    titles = pq.read_table(out / raw["items_text"]["path"])
    idf = (
        DocumentFrequency.empty(config.vocab_size)
        .update(text_id_column(titles["text"], config))
        .idf()
    )
    rows = events(out).to_pylist()
    own_query_excluded = full_history = 0
    for row in rows:
        past = sorted(q for q in by_user[row["user_id"]] if q[0] < row["timestamp"])[::-1]
        past = past[: FEATURES.search_history]
        expected = [i for _, text in past for i in text_ids(text, config)]
        assert row["search_query_tokens"] == expected
        np.testing.assert_allclose(row[weights_column("search_query_tokens")], idf[expected])
        own_query_excluded += any(t == row["timestamp"] for t, _ in by_user[row["user_id"]])
        full_history += len(past) == FEATURES.search_history
    assert own_query_excluded > 100 and full_history > 100
    share = len(queries) / len({(r["user_id"], r["timestamp"]) for r in rows})
    assert 0.2 < share < 0.4  # search_probability 0.3 (eval sessions only partly in the rows)


def test_item_text_is_tied_to_topics(with_eval: tuple[Path, Manifest]) -> None:
    out, manifest = with_eval
    config = TextHashConfig(vocab_size=FEATURES.text_vocab_size)
    corpus = pq.read_table(out / "items")
    titles = pq.read_table(out / manifest.extra["raw"]["items_text"]["path"])
    tokens = corpus["item_text_tokens"].to_pylist()
    assert tokens == [text_ids(t, config) for t in titles["text"].to_pylist()]
    idf = DocumentFrequency.empty(config.vocab_size).update(corpus["item_text_tokens"]).idf()
    for ids, weights in zip(tokens, corpus[weights_column("item_text_tokens")].to_pylist()):
        np.testing.assert_allclose(weights, idf[ids])
    item_topics = np.load(out / manifest.extra["truth"]["item_topics"]["path"])
    dominant = item_topics.argmax(axis=1)
    sets = [set(t) for t in tokens]
    shared: dict[bool, list[int]] = {True: [], False: []}
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            shared[bool(dominant[i] == dominant[j])].append(len(sets[i] & sets[j]))
    assert np.mean(shared[True]) > 1.4 * np.mean(shared[False])
    # Event rows carry their item's text.
    train = pq.read_table(out / "train", columns=["item_id", "item_text_tokens"])
    by_item = corpus["item_text_tokens"].take(train["item_id"]).to_pylist()
    assert train["item_text_tokens"].to_pylist() == by_item


def test_context_ids(with_eval: tuple[Path, Manifest]) -> None:
    out, manifest = with_eval
    table = events(out)
    times = table["timestamp"].to_numpy()
    for name, values in time_context(times).items():
        np.testing.assert_array_equal(table[name].to_numpy(), values)
    for name in ("ctx_hour", "ctx_weekday", "ctx_device", "ctx_locale"):
        values = table[name].to_numpy()
        assert values.min() >= 0 and values.max() < manifest.tables[name]
        assert len(np.unique(values)) == manifest.tables[name], name  # every id occurs
    users = table["user_id"].to_numpy()
    locale, region = table["ctx_locale"].to_numpy(), table["region"].to_numpy()
    assert (locale == region % FEATURES.locales).mean() > 0.6
    # One session, one context: every impression of it agrees.
    session = pa.table({"u": users, "t": times, "d": table["ctx_device"], "l": table["ctx_locale"]})
    per_session = session.group_by(["u", "t"]).aggregate(
        [("d", "count_distinct"), ("l", "count_distinct")]
    )
    assert per_session["d_count_distinct"].to_numpy().max() == 1
    assert per_session["l_count_distinct"].to_numpy().max() == 1
    # Devices follow a per-user preference: the top device of a user beats a uniform share.
    top_share = [
        np.bincount(table["ctx_device"].to_numpy()[users == u]).max() / (users == u).sum()
        for u in np.unique(users)
    ]
    assert np.mean(top_share) > 1.3 / FEATURES.devices


def test_topic_affinity(with_eval: tuple[Path, Manifest]) -> None:
    out, manifest = with_eval
    side = pq.read_table(out / "users")
    ids = side["user_topic_affinity"].to_pylist()
    weights = side[weights_column("user_topic_affinity")].to_pylist()
    k = FEATURES.topics.affinity_top_k
    assert manifest.tables["topic"] == FEATURES.topics.topics
    user_topics = np.load(out / manifest.extra["truth"]["user_topics"]["path"])
    truth_top = np.argsort(-user_topics, axis=1)[:, :k]
    agree = 0
    for user, (row_ids, row_weights) in enumerate(zip(ids, weights)):
        assert len(row_ids) == len(row_weights) == k and len(set(row_ids)) == k
        assert all(0 <= i < FEATURES.topics.topics for i in row_ids)
        assert all(w > 0 for w in row_weights) and row_weights == sorted(row_weights)[::-1]
        agree += row_ids[0] in truth_top[user]
    assert agree > 0.8 * len(ids)
    rows = pq.read_table(out / "train")
    by_user = side["user_topic_affinity"].take(rows["user_id"]).to_pylist()
    assert rows["user_topic_affinity"].to_pylist() == by_user


def test_shards_validate_and_base_columns_unchanged(
    tmp_path: Path, with_eval: tuple[Path, Manifest]
) -> None:
    out, manifest = with_eval
    assert Manifest.load(out).to_json() == manifest.to_json()
    schema = manifest.schema
    for split in manifest.splits:
        manifest.verify_checksums(out, split)
    for split in ("train", "valid", "test"):
        for path in manifest.split_paths(out, split):
            validate_arrow_schema(pq.read_schema(path), schema.event_arrow_schema(), path)
    for split, side in (("users", Side.USER), ("items", Side.ITEM)):
        for path in manifest.split_paths(out, split):
            validate_arrow_schema(pq.read_schema(path), schema.side_arrow_schema(side), path)
    per_event = {f.name for f in schema.features if f.per_event}
    assert per_event == {
        "ctx_hour",
        "ctx_weekday",
        "ctx_device",
        "ctx_locale",
        "search_query_tokens",
    }
    assert not per_event & set(pq.read_schema(manifest.split_paths(out, "users")[0]).names)
    groups = {f.name: f.feature_group for f in schema.features}
    assert groups["search_query_tokens"] is FeatureGroup.SEARCH
    assert groups["item_text_tokens"] is FeatureGroup.TEXT
    assert groups["user_topic_affinity"] is FeatureGroup.AFFINITY
    for feature in schema.features:
        assert feature.table in manifest.tables, feature.name
    assert manifest.extra["generator"]["features"]["counter_windows"] == {
        "1h": 3600,
        "6h": 21600,
        "1d": 86400,
    }
    # Same seed, same bytes; the base columns are those of a run without the extra groups.
    again = prepare_synthetic(out=tmp_path / "again", valid_fraction=0.1, test_fraction=0.1, **RUN)
    assert again.to_json()["splits"] == manifest.to_json()["splits"]
    assert again.extra["raw"] == manifest.extra["raw"]
    plain_run = {**RUN, "features": SyntheticFeatures.none()}
    plain = prepare_synthetic(
        out=tmp_path / "plain", valid_fraction=0.1, test_fraction=0.1, **plain_run
    )
    assert plain.counters == {} and plain.extra["raw"] == {}
    base = pq.read_table(tmp_path / "plain" / "train")
    assert pq.read_table(out / "train").select(base.column_names).equals(base)


def test_invalid_feature_knobs() -> None:
    assert parse_window("10m") == 600 and parse_window("2w") == 14 * 86400
    for bad in ("0h", "1y", "h", "1.5h"):
        with pytest.raises(ValueError, match="counter window"):
            parse_window(bad)
    with pytest.raises(ValueError, match="groups"):
        SyntheticFeatures(groups=(FeatureGroup.HISTORY,))
    with pytest.raises(ValueError, match="search_probability"):
        SyntheticFeatures(search_probability=1.5)
    with pytest.raises(ValueError, match="counter window"):
        SyntheticFeatures(counter_windows=("1x",))
    with pytest.raises(ValueError, match="title_words"):
        TopicConfig(title_words=(5, 3))
    with pytest.raises(ValueError, match="affinity_top_k"):
        TopicConfig(topics=2, affinity_top_k=3)


def test_device_effect_shifts_clicks(tmp_path: Path, with_eval: tuple[Path, Manifest]) -> None:
    """Opt-in: the session's device pulls relevance towards its topics, so clicked impressions
    lean towards them; devices themselves (their own stream) are those of the run without it."""
    base_out, base = with_eval
    assert (
        "device_topics" not in base.extra["truth"] and "ctx_device" not in base.extra["relevance"]
    )
    features = SyntheticFeatures(
        counter_windows=FEATURES.counter_windows, text_vocab_size=1 << 12, device_effect=3.0
    )
    run = {**RUN, "features": features, "valid_fraction": 0.0, "test_fraction": 0.0}
    manifest = prepare_synthetic(out=tmp_path, **run)
    assert "device_topics" in manifest.extra["relevance"]
    device_topics = np.load(tmp_path / manifest.extra["truth"]["device_topics"]["path"])
    item_topics = np.load(tmp_path / manifest.extra["truth"]["item_topics"]["path"])
    train = pq.read_table(tmp_path / "train")
    device, item = train["ctx_device"].to_numpy(), train["item_id"].to_numpy()
    pull = np.einsum("rt,rt->r", device_topics[device], item_topics[item])
    click = train["label_click"].to_numpy() == 1
    assert pull[click].mean() > pull[~click].mean() + 0.1
    base_train = pq.read_table(base_out / "train", columns=["user_id", "ctx_device"])
    rows = base_train.num_rows
    assert train["user_id"].to_numpy()[:rows].tolist() == base_train["user_id"].to_pylist()
    assert device[:rows].tolist() == base_train["ctx_device"].to_pylist()
    with pytest.raises(ValueError, match="device_effect"):
        SyntheticFeatures(groups=(FeatureGroup.CONTEXT,), device_effect=1.0)
