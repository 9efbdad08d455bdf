"""Global temporal split (``--split temporal``): thresholds, split sides, point-in-time histories,
counters and snapshots of the tiny MovieLens fixture, checked by brute force over its raw
ratings; quantile errors; the unchanged default; the synthetic world's shared vocabulary."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.datasets.movielens import prepare_movielens
from data_pipeline.datasets.split import (
    SplitConfig,
    SplitProtocol,
    session_fractions,
    session_quantiles,
    temporal_thresholds,
)
from data_pipeline.manifest import Manifest
from launch.cli import main
from tests.data_pipeline.test_movielens import raw_events, write_ml100k
from tests.data_pipeline.test_movielens_features import (
    COUNTERS,
    KINDS,
    WINDOWS,
    brute_force_counts,
    spread_log,
)
from tests.tiny_movielens import HISTORY, TEXT_VOCAB, U_ITEM

VALID_QUANTILE, TEST_QUANTILE = 0.8, 0.9
TEMPORAL = SplitConfig(SplitProtocol.TEMPORAL, VALID_QUANTILE, TEST_QUANTILE)
Rating = tuple[int, int, int, int]  # raw user, raw item, rating, timestamp


class Prepared(NamedTuple):
    out: Path
    manifest: Manifest
    data: list[Rating]
    valid_start: int  # T1 by brute force
    test_start: int  # T2


def tiny_source(root: Path) -> Path:
    """The raw files of :func:`tests.tiny_movielens.write_tiny_movielens`."""
    source = write_ml100k(root / "src", spread_log())
    (source / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    return source


def reference_thresholds(
    data: list[Rating], valid_quantile: float, test_quantile: float
) -> tuple[int, int]:
    """T = the timestamp at 0-based position floor(q · N) of the time-sorted log."""
    times = sorted(t for *_, t in data)
    return (
        times[math.floor(valid_quantile * len(times))],
        times[math.floor(test_quantile * len(times))],
    )


@pytest.fixture(scope="module")
def temporal(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    root = tmp_path_factory.mktemp("ml_temporal")
    out = root / "out"
    manifest = prepare_movielens(
        "100k", out, tiny_source(root), HISTORY, text_vocab_size=TEXT_VOCAB, split=TEMPORAL
    )
    data = spread_log()
    return Prepared(out, manifest, data, *reference_thresholds(data, VALID_QUANTILE, TEST_QUANTILE))


def test_thresholds_are_the_event_time_quantiles(temporal: Prepared) -> None:
    split = temporal.manifest.extra["split"]
    assert split["protocol"] == "temporal"
    assert (split["valid_quantile"], split["test_quantile"]) == (VALID_QUANTILE, TEST_QUANTILE)
    assert split["valid_start_timestamp"] == temporal.valid_start
    assert split["test_start_timestamp"] == temporal.test_start
    assert temporal.valid_start < temporal.test_start
    assert "global temporal" in temporal.manifest.extra["split_rule"]
    times = [t for *_, t in temporal.data]
    # The fixture ties at T1: the position floor(q · N) shares its second with earlier events,
    # which all go to valid with it (train holds fewer than floor(q · N) events).
    assert sum(t < temporal.valid_start for t in times) < math.floor(VALID_QUANTILE * len(times))
    assert Manifest.load(temporal.out).extra["split"] == split


def test_every_event_lies_on_its_side_of_the_thresholds(temporal: Prepared) -> None:
    events = raw_events(temporal.out)
    # Every rating is exactly one row: each held-out event is its own query.
    assert sorted((r["raw_user"], r["raw_item"]) for r in events) == sorted(
        (u, i) for u, i, *_ in temporal.data
    )
    t1, t2 = temporal.valid_start, temporal.test_start
    sides = {"train": lambda t: t < t1, "valid": lambda t: t1 <= t < t2, "test": lambda t: t2 <= t}
    for row in events:
        assert sides[row["split"]](row["timestamp"]), row
    counts = temporal.manifest.extra["counts"]
    for name, inside in sides.items():
        expected = sum(1 for *_, t in temporal.data if inside(t))
        assert expected > 0 and temporal.manifest.splits[name].rows == expected
        assert counts[f"{name}_rows"] == expected
        users = {u for u, *_, t in temporal.data if inside(t)}
        assert counts[f"{name}_users"] == len(users)
    assert "users_without_holdout" not in counts


def expected_history(data: list[Rating], user: int, before: int, length: int) -> list[Rating]:
    """The user's ratings of seconds before ``before``, newest first by (time, item)."""
    earlier = [r for r in data if r[0] == user and r[3] < before]
    return sorted(earlier, key=lambda r: (r[3], r[1]), reverse=True)[:length]


def test_histories_hold_only_strictly_earlier_events(temporal: Prepared) -> None:
    non_empty = 0
    for row in raw_events(temporal.out):
        expected = expected_history(temporal.data, row["raw_user"], row["timestamp"], HISTORY)
        assert row["raw_history"] == [i for _, i, _, _ in expected], row
        assert row["hist_timestamps"] == [t for *_, t in expected]
        assert row["hist_like"] == [int(r >= 4) for _, _, r, _ in expected]
        assert all(t < row["timestamp"] for t in row["hist_timestamps"])
        non_empty += row["split"] != "train" and bool(expected)
    assert non_empty > 0  # eval rows do carry histories


def test_event_counters_count_strictly_earlier_events(temporal: Prepared) -> None:
    for row in raw_events(temporal.out):
        for kind in KINDS:
            for window, seconds in WINDOWS.items():
                expected = brute_force_counts(
                    temporal.data, row["raw_item"], row["timestamp"], seconds, kind
                )
                assert row[f"item_{kind}_count_{window}"] == expected, (row, kind, window)


def test_items_snapshot_counts_only_events_before_t1(temporal: Prepared) -> None:
    at = temporal.valid_start
    counters = temporal.manifest.extra["counters"]
    assert counters["snapshot_time"] == at and "T1" in counters["snapshot_rule"]
    before = [r for r in temporal.data if r[3] < at]
    raw_items = pq.read_table(temporal.out / "raw_ids" / "items.parquet")["raw_item_id"]
    nonzero = 0
    for item in pq.read_table(temporal.out / "items").to_pylist():
        raw = raw_items[item["item_id"]].as_py()
        for kind in KINDS:
            for window, seconds in WINDOWS.items():
                expected = brute_force_counts(before, raw, at, seconds, kind)
                assert item[f"item_{kind}_count_{window}"] == expected, (raw, kind, window)
                nonzero += expected > 0
    assert nonzero > 0


def test_statistics_and_popularity_see_only_events_before_t1(temporal: Prepared) -> None:
    train = pq.read_table(temporal.out / "train")
    before = [r for r in temporal.data if r[3] < temporal.valid_start]
    for name in COUNTERS:
        assert temporal.manifest.counters[name]["count"] == len(before)
    # The popularity baseline (trainer.evaluation.evaluate.popularity_scores) counts train rows' items.
    raw_items = pq.read_table(temporal.out / "raw_ids" / "items.parquet")["raw_item_id"]
    dense = {raw: dense for dense, raw in enumerate(raw_items.to_pylist())}
    num_items = len(dense)
    popularity = np.bincount(train["item_id"].to_numpy(), minlength=num_items)
    expected = np.bincount([dense[i] for _, i, _, _ in before], minlength=num_items)
    assert popularity.tolist() == expected.tolist()


def test_users_snapshot_is_static(temporal: Prepared, tmp_path: Path) -> None:
    default = prepare_movielens(
        "100k", tmp_path / "out", tiny_source(tmp_path), HISTORY, text_vocab_size=TEXT_VOCAB
    )
    assert default.splits["users"].files == temporal.manifest.splits["users"].files


@st.composite
def tied_logs(draw: st.DrawFn) -> list[Rating]:
    """Up to 50 unique (user, item) ratings over 16 seconds: same-second ties are common, also
    within a user and at the thresholds."""
    pairs = draw(
        st.lists(
            st.tuples(st.integers(1, 6), st.integers(1, 12)), min_size=4, max_size=50, unique=True
        )
    )
    return [(u, i, draw(st.integers(1, 5)), draw(st.integers(0, 15))) for u, i in pairs]


@settings(max_examples=30, deadline=None)
@given(
    tied_logs(),
    st.integers(1, 4),
    st.sampled_from([(0.5, 0.75), (0.3, 0.6), (0.8, 0.9), (0.6, 0.95)]),
)
def test_random_logs_by_brute_force(data, history_length: int, quantiles) -> None:  # type: ignore[no-untyped-def]
    """Few timestamps, many ties: thresholds, sides and strict histories, or a clear error."""
    t1, t2 = reference_thresholds(data, *quantiles)
    config = SplitConfig(SplitProtocol.TEMPORAL, *quantiles)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_ml100k(root / "src", data, side_files=False)
        if t1 == min(t for *_, t in data) or t1 == t2:  # train or valid would be empty
            with pytest.raises(ValueError, match="--valid-quantile"):
                prepare_movielens("100k", root / "out", source, history_length, split=config)
            return
        manifest = prepare_movielens("100k", root / "out", source, history_length, split=config)
        events = raw_events(root / "out")
    assert manifest.extra["split"]["valid_start_timestamp"] == t1
    assert manifest.extra["split"]["test_start_timestamp"] == t2
    assert len(events) == len(data)
    for row in events:
        t = row["timestamp"]
        assert {"train": t < t1, "valid": t1 <= t < t2, "test": t2 <= t}[row["split"]]
        expected = expected_history(data, row["raw_user"], t, history_length)
        assert row["raw_history"] == [i for _, i, _, _ in expected]


@pytest.mark.parametrize(
    ("valid_quantile", "test_quantile", "flag"),
    [
        (0.0, 0.9, "--valid-quantile"),
        (-0.1, 0.9, "--valid-quantile"),
        (math.nan, 0.9, "--valid-quantile"),
        (0.8, 1.0, "--test-quantile"),
        (0.8, 1.5, "--test-quantile"),
        (0.9, 0.8, "must be below --test-quantile"),
        (0.8, 0.8, "must be below --test-quantile"),
    ],
)
def test_bad_quantiles_name_the_flag(
    valid_quantile: float, test_quantile: float, flag: str
) -> None:
    with pytest.raises(ValueError, match=flag):
        SplitConfig(SplitProtocol.TEMPORAL, valid_quantile, test_quantile)
    with pytest.raises(ValueError, match=flag):
        session_fractions(valid_quantile, test_quantile)


def test_empty_train_or_valid_is_an_error() -> None:
    ties = np.array([1, 1, 1, 1, 2, 2, 2, 2, 2, 3], dtype=np.int64)
    with pytest.raises(ValueError, match="valid would be empty"):
        temporal_thresholds(ties, 0.5, 0.6)  # T1 = T2 = 2
    with pytest.raises(ValueError, match="train would be empty"):
        temporal_thresholds(ties, 0.2, 0.6)  # T1 = 1, the first second
    thresholds = temporal_thresholds(ties, 0.4, 0.9)  # positions 4 and 9
    assert (thresholds.valid_start, thresholds.test_start) == (2, 3)


def test_cli_rejects_bad_split_flags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    base = ["prepare", "movielens", "--out", str(out), "--source", str(tmp_path / "missing")]
    cases = [
        (["--split", "temporal", "--valid-quantile", "0.95"], "--valid-quantile (0.95)"),
        (["--split", "temporal", "--test-quantile", "1"], "--test-quantile must lie in (0, 1)"),
        (["--valid-quantile", "0.7"], "applies to --split temporal only"),
    ]
    with caplog.at_level(logging.ERROR):
        for extra, message in cases:
            caplog.clear()
            assert main([*base, *extra]) == 2
            assert message in caplog.text
        caplog.clear()
        synthetic = ["prepare", "synthetic", "--out", str(out), "--split", "leave-last-out"]
        assert main(synthetic) == 2
        assert "--split leave-last-out is not supported" in caplog.text
    assert not out.exists()  # refused before anything is written


def test_default_output_is_unchanged(tmp_path: Path) -> None:
    source = tiny_source(tmp_path)
    default = prepare_movielens("100k", tmp_path / "a", source, HISTORY)
    explicit = prepare_movielens("100k", tmp_path / "b", source, HISTORY, split=SplitConfig())
    args = ["--source", str(source), "--history-length", str(HISTORY)]
    assert main(["prepare", "movielens", "--out", str(tmp_path / "c"), *args]) == 0
    from_cli = Manifest.load(tmp_path / "c")
    for manifest in (explicit, from_cli):
        assert manifest.to_json()["splits"] == default.to_json()["splits"]
        assert manifest.extra == default.extra
    assert "split" not in default.extra
    assert default.extra["split_rule"].startswith("leave-last-out per user")
    assert "max train timestamp + 1" in default.extra["counters"]["snapshot_rule"]


def test_synthetic_quantiles_map_to_session_fractions() -> None:
    assert session_fractions(0.9, 0.95) == (0.05, 0.05)  # the CLI default: today's fractions
    assert session_fractions(0.7, 0.85) == (0.15, 0.15)
    assert session_quantiles(0.05, 0.05) == (0.9, 0.95)
    assert session_quantiles(*session_fractions(0.63, 0.81)) == (0.63, 0.81)


def test_synthetic_split_speaks_the_temporal_vocabulary(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    world = ["--users", "40", "--items", "30", "--events", "3000", "--feature-groups", "none"]
    quantiles = ["--valid-quantile", "0.7", "--test-quantile", "0.85"]
    assert main(["prepare", "synthetic", "--out", str(out), *world, *quantiles]) == 0
    manifest = Manifest.load(out)
    split = manifest.extra["split"]
    assert split["protocol"] == "temporal" and split["quantile_of"] == "session indices"
    assert (split["valid_quantile"], split["test_quantile"]) == (0.7, 0.85)
    generator = manifest.extra["generator"]
    assert (generator["valid_fraction"], generator["test_fraction"]) == (0.15, 0.15)
    t1, t2 = split["valid_start_timestamp"], split["test_start_timestamp"]
    times = {
        name: pq.read_table(out / name)["timestamp"].to_numpy()
        for name in ("train", "valid", "test")
    }
    assert times["train"].max() < t1 <= times["valid"].min()
    assert times["valid"].max() < t2 <= times["test"].min()
