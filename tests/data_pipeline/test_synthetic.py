"""Synthetic world: determinism, chunked generation, history against a sequential reference,
labels, positions, popularity skew, the logged ranker score, and impression hard negatives (column
against a per-session reference; ``BatchBuilder`` / loader padding to ``[B, K]``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.batch import BatchBuilder
from data_pipeline.datasets.synthetic import prepare_synthetic
from data_pipeline.datasets.synthetic_world import WorldConfig
from data_pipeline.loader import LoaderSpec, build_event_loader
from data_pipeline.manifest import Manifest, sha256_file
from data_pipeline.schema import (
    IMPRESSION_NEGATIVES,
    EventSchema,
    FeatureKind,
    FeatureSpec,
    SchemaError,
    Side,
    validate_arrow_schema,
)
from tests.tiny_dataset import write_tiny_dataset

SMALL = {"users": 40, "items": 200, "events": 6000, "seed": 7, "history_length": 5}


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """Many small chunks (30 sessions of 10 each), so histories cross chunk boundaries."""
    out = tmp_path_factory.mktemp("synthetic")
    return out, prepare_synthetic(out=out, chunk_events=300, row_group_rows=1000, **SMALL)


def events(out: Path) -> pa.Table:
    tables = []
    for split in ("train", "valid", "test"):
        table = pq.read_table(out / split)
        tables.append(table.append_column("split", pa.array([split] * table.num_rows)))
    return pa.concat_tables(tables)


def test_same_seed_same_bytes(tmp_path: Path, chunked: tuple[Path, Manifest]) -> None:
    _, manifest = chunked
    again = prepare_synthetic(out=tmp_path / "a", chunk_events=300, row_group_rows=1000, **SMALL)
    assert again.to_json()["splits"] == manifest.to_json()["splits"]
    assert again.extra["truth"] == manifest.extra["truth"]
    other = prepare_synthetic(
        out=tmp_path / "b", chunk_events=300, row_group_rows=1000, **{**SMALL, "seed": 8}
    )
    assert other.splits["train"].files[0].sha256 != manifest.splits["train"].files[0].sha256


def test_manifest_checksums_and_schema(chunked: tuple[Path, Manifest]) -> None:
    out, manifest = chunked
    assert Manifest.load(out).to_json() == manifest.to_json()
    for split in manifest.splits:
        manifest.verify_checksums(out, split)
    for entry in manifest.extra["truth"].values():
        assert sha256_file(out / entry["path"]) == entry["sha256"]
    for path in manifest.split_paths(out, "train"):
        validate_arrow_schema(pq.read_schema(path), manifest.schema.event_arrow_schema(), path)
    assert np.load(out / "truth" / "item_factors.npy").shape == (200, 16)
    assert np.load(out / "truth" / "user_factors.npy").shape == (40, 16)
    assert np.load(out / "truth" / "item_bias.npy").shape == (200,)
    assert manifest.schema.has_ranker_score and manifest.schema.history_actions == (
        "like",
        "long_view",
    )
    table = events(out)
    assert table.num_rows == manifest.splits["train"].rows + manifest.splits["valid"].rows + (
        manifest.splits["test"].rows
    )
    assert manifest.extra["counts"]["impressions"] == SMALL["events"]
    for feature in manifest.schema.features:
        if feature.kind.value == "id":
            values = table[feature.name].to_numpy()
            assert 0 <= values.min() and values.max() < manifest.tables[feature.table]


def test_labels_positions_and_eval_rows(chunked: tuple[Path, Manifest]) -> None:
    out, _ = chunked
    table = events(out)
    click = table["label_click"].to_numpy()
    like = table["label_like"].to_numpy()
    long_view = table["label_long_view"].to_numpy()
    for label in (click, like, long_view):
        assert set(np.unique(label)) <= {0.0, 1.0}
    assert (like <= click).all() and (long_view <= click).all()
    position = table["position"].to_numpy()
    assert position.min() == 0 and position.max() == WorldConfig().positions - 1
    split = np.array(table["split"].to_pylist())
    train = table.filter(pa.array(split == "train"))
    shown = set(zip(*(train[c].to_pylist() for c in ("timestamp", "position", "item_id"))))
    per_session = {(t, i) for t, _, i in shown}
    assert len(per_session) == len(shown)  # no item shown twice in one session
    assert (click[split != "train"] == 1).all()  # eval rows are positives
    assert (split == "valid").any() and (split == "test").any()
    timestamps = table["timestamp"].to_numpy()
    assert timestamps[split == "train"].max() < timestamps[split == "valid"].min()
    assert timestamps[split == "valid"].max() < timestamps[split == "test"].min()


def test_history_matches_sequential_reference(chunked: tuple[Path, Manifest]) -> None:
    """Clicked items of earlier sessions, newest first, at most H; every click is kept in some
    split, so the clicks in the output are the whole click log."""
    out, _ = chunked
    rows = sorted(events(out).to_pylist(), key=lambda r: (r["timestamp"], r["position"]))
    clicks: dict[int, list[tuple[int, int, int, int, int]]] = defaultdict(list)
    for row in rows:
        if row["label_click"] == 1:
            clicks[row["user_id"]].append(
                (
                    row["timestamp"],
                    row["position"],
                    row["item_id"],
                    int(row["label_like"]),
                    int(row["label_long_view"]),
                )
            )
    checked = 0
    for row in rows:
        earlier = [c for c in clicks[row["user_id"]] if c[0] < row["timestamp"]][::-1]
        earlier = earlier[: SMALL["history_length"]]
        assert row["hist_item_ids"] == [c[2] for c in earlier]
        assert row["hist_like"] == [c[3] for c in earlier]
        assert row["hist_long_view"] == [c[4] for c in earlier]
        assert row["hist_timestamps"] == [c[0] for c in earlier]  # strictly before the row
        checked += len(earlier) == SMALL["history_length"]
    assert checked > 100  # the truncation at H is exercised


def test_chunk_size_does_not_change_volume(tmp_path: Path) -> None:
    one_chunk = prepare_synthetic(out=tmp_path / "one", chunk_events=1 << 18, **SMALL)
    assert one_chunk.extra["counts"]["impressions"] == SMALL["events"]
    odd = prepare_synthetic(out=tmp_path / "odd", chunk_events=250, **{**SMALL, "events": 5999})
    assert odd.extra["counts"]["impressions"] == 5999


def test_popularity_is_skewed_and_ranker_score_tracks_clicks(tmp_path: Path) -> None:
    out = tmp_path / "skew"
    prepare_synthetic(users=500, items=1000, events=60_000, seed=1, out=out)
    train = pq.read_table(out / "train", columns=["item_id", "label_click", "ranker_score"])
    counts = np.sort(np.bincount(train["item_id"].to_numpy(), minlength=1000))[::-1]
    assert counts[:200].sum() / counts.sum() > 0.6  # top 20% of items hold most impressions
    score = train["ranker_score"].to_numpy()
    click = train["label_click"].to_numpy()
    assert np.corrcoef(score, click)[0, 1] > 0.2
    # AUC of the logged score for clicks, by ranks.
    ranks = np.argsort(np.argsort(score)) + 1
    positives = click == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    auc = (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert auc > 0.7


def test_features_correlate_with_latent_factors(chunked: tuple[Path, Manifest]) -> None:
    out, _ = chunked
    factors = np.load(out / "truth" / "item_factors.npy")
    category = pq.read_table(out / "items")["category"].to_numpy()
    # Items of one category are closer to each other than to random items.
    centroid = np.stack([factors[category == c].mean(0) for c in np.unique(category)])
    own = np.einsum("md,md->m", factors, centroid[np.searchsorted(np.unique(category), category)])
    assert own.mean() > (factors @ centroid.T).mean()


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="events"):
        prepare_synthetic(users=1, items=1, events=0, seed=0, out=tmp_path)
    with pytest.raises(ValueError, match="candidates_per_session"):
        WorldConfig(positions=10, candidates_per_session=5)


def _in_order_share(out: Path) -> float:
    """Share of adjacent train slots whose logged ranker score does not increase."""
    train = pq.read_table(out / "train", columns=["position", "ranker_score"])
    slots = WorldConfig().positions
    assert (train["position"].to_numpy()[::slots] == 0).all()
    score = train["ranker_score"].to_numpy().reshape(-1, slots)
    return float((np.diff(score, axis=1) <= 0).mean())


def test_promotion_and_shuffled_sessions(tmp_path: Path, chunked: tuple[Path, Manifest]) -> None:
    default_out, default = chunked
    assert "item_promotion" not in default.extra["truth"]
    assert "promotion_std" not in default.extra["generator"]
    world = WorldConfig(promotion_std=3.0)
    kwargs = {"chunk_events": 300, "row_group_rows": 1000, "world": world, **SMALL}
    promoted = prepare_synthetic(out=tmp_path / "a", **kwargs)
    again = prepare_synthetic(out=tmp_path / "b", **kwargs)
    assert again.to_json()["splits"] == promoted.to_json()["splits"]
    assert again.extra["truth"] == promoted.extra["truth"]
    assert promoted.extra["generator"]["promotion_std"] == 3.0
    # The boost has its own stream: the rest of the world is the default one.
    for name in ("user_factors", "item_factors", "item_bias", "item_popularity"):
        assert promoted.extra["truth"][name] == default.extra["truth"][name]
    boost = np.load(tmp_path / "a" / "truth" / "item_promotion.npy")
    assert boost.shape == (SMALL["items"],) and 2.0 < boost.std() < 4.0
    # Promoted items are shown higher; the logged score is the relevance estimate, without boost.
    train = pq.read_table(tmp_path / "a" / "train", columns=["item_id", "position"])
    item_boost = boost[train["item_id"].to_numpy()]
    assert np.corrcoef(item_boost, train["position"].to_numpy())[0, 1] < -0.3
    assert _in_order_share(tmp_path / "a") < _in_order_share(default_out) - 0.1
    shuffled = WorldConfig(shuffled_fraction=1.0)
    prepare_synthetic(out=tmp_path / "c", **{**kwargs, "world": shuffled})
    assert _in_order_share(default_out) > 0.9
    assert 0.4 < _in_order_share(tmp_path / "c") < 0.6
    with pytest.raises(ValueError, match="promotion_std"):
        WorldConfig(promotion_std=-1.0)
    with pytest.raises(ValueError, match="shuffled_fraction"):
        WorldConfig(shuffled_fraction=1.5)


def _session_reference(rows: list[dict]) -> dict[tuple[int, int], list[tuple[int, int, bool]]]:
    """(user, timestamp) -> [(position, item, engaged)] of every impression of that session."""
    sessions: dict[tuple[int, int], list[tuple[int, int, bool]]] = defaultdict(list)
    for row in rows:
        engaged = any(row[f"label_{x}"] != 0 for x in ("click", "like", "long_view"))
        sessions[row["user_id"], row["timestamp"]].append(
            (row["position"], row["item_id"], engaged)
        )
    return sessions


def _check_train_negatives(train: pa.Table) -> int:
    """Every train row's list equals its session's unengaged items, by position, minus its own;
    returns how many rows have a non-empty list."""
    rows = train.to_pylist()
    sessions = _session_reference(rows)
    non_empty = 0
    for row in rows:
        shown = sorted(sessions[row["user_id"], row["timestamp"]])
        expected = [item for _, item, engaged in shown if not engaged and item != row["item_id"]]
        assert row[IMPRESSION_NEGATIVES] == expected
        non_empty += bool(expected)
    return non_empty


def test_impression_negatives_match_session_reference(chunked: tuple[Path, Manifest]) -> None:
    """Train keeps every impression, so each session is complete there: the column must be
    exactly the same-session unengaged items (never the row's own item, never another session's
    item, ordered by position). Chunks hold 30 sessions, so chunk boundaries are crossed."""
    out, _ = chunked
    table = events(out)
    split = np.array(table["split"].to_pylist())
    train = table.filter(pa.array(split == "train"))
    assert _check_train_negatives(train) > 0.5 * train.num_rows
    # Eval rows keep only clicks; their lists still avoid every click of their session.
    evaluation = table.filter(pa.array(split != "train")).to_pylist()
    clicked = defaultdict(set)
    for row in evaluation:
        clicked[row["user_id"], row["timestamp"]].add(row["item_id"])
    for row in evaluation:
        assert not clicked[row["user_id"], row["timestamp"]] & set(row[IMPRESSION_NEGATIVES])
    assert any(row[IMPRESSION_NEGATIVES] for row in evaluation)


def test_impression_negatives_of_a_cut_last_session(tmp_path: Path) -> None:
    """1003 events = 100 full sessions + a 3-slot one; chunks of 25 sessions; all rows in train."""
    manifest = prepare_synthetic(
        users=20,
        items=100,
        events=1003,
        seed=3,
        out=tmp_path,
        history_length=3,
        valid_fraction=0.0,
        test_fraction=0.0,
        chunk_events=250,
    )
    train = pq.read_table(tmp_path / "train")
    assert train.num_rows == 1003
    _check_train_negatives(train)
    last = train.slice(1000).to_pylist()
    unengaged = [r["item_id"] for r in last if r["label_click"] == 0]
    for row in last:
        assert row[IMPRESSION_NEGATIVES] == [i for i in unengaged if i != row["item_id"]]
    assert manifest.schema.has_impression_negatives


def test_impression_negatives_flag_round_trips(chunked: tuple[Path, Manifest]) -> None:
    out, manifest = chunked
    assert manifest.schema.has_impression_negatives
    assert Manifest.load(out).schema == manifest.schema
    assert IMPRESSION_NEGATIVES in manifest.schema.event_arrow_schema().names
    old = manifest.schema.to_json()
    del old["has_impression_negatives"]  # a manifest written before the flag existed
    schema = EventSchema.from_json(old)
    assert not schema.has_impression_negatives
    assert IMPRESSION_NEGATIVES not in schema.event_arrow_schema().names


def test_loader_pads_impression_negatives(chunked: tuple[Path, Manifest]) -> None:
    out, manifest = chunked
    spec = LoaderSpec(root=str(out), split="train", batch_size=128, impression_negatives=3)
    got = torch.cat([b.impression_negatives for b in build_event_loader(spec, manifest, 0, 1)])
    lists = pq.read_table(out / "train")[IMPRESSION_NEGATIVES].to_pylist()
    expected = [(x[:3] + [-1, -1, -1])[:3] for x in lists]
    assert torch.equal(got, torch.tensor(expected, dtype=torch.int64))


def test_loader_without_impressions_names_the_column(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    spec = LoaderSpec(root=str(root), split="train", batch_size=64, impression_negatives=2)
    with pytest.raises(SchemaError, match=IMPRESSION_NEGATIVES):
        build_event_loader(spec, Manifest.load(root), 0, 1)


ITEM_ONLY = EventSchema(
    features=(FeatureSpec("item_id", Side.ITEM, FeatureKind.ID, "item_id"),), labels=("click",)
)


def _hand_built_events() -> pa.Table:
    """Lists of length 0, 1 and 3, in two chunks with a non-zero offset (sliced)."""
    first = pa.table(
        {
            "item_id": pa.array([99, 4], pa.int64()),
            "label_click": pa.array([1, 1], pa.float32()),
            IMPRESSION_NEGATIVES: pa.array([[98], []], pa.list_(pa.int64())),
        }
    )
    second = pa.table(
        {
            "item_id": pa.array([5, 6], pa.int64()),
            "label_click": pa.array([1, 0], pa.float32()),
            IMPRESSION_NEGATIVES: pa.array([[7], [1, 2, 3]], pa.list_(pa.int64())),
        }
    )
    return pa.concat_tables([first, second]).slice(1)


def test_batch_builder_pads_impression_negatives() -> None:
    table = _hand_built_events()
    batch = BatchBuilder(ITEM_ONLY, impression_negatives=2)(table)
    expected = torch.tensor([[-1, -1], [7, -1], [1, 2]], dtype=torch.int64)
    assert torch.equal(batch.impression_negatives, expected)
    assert torch.equal(batch.to(torch.device("cpu")).impression_negatives, expected)
    assert torch.equal(batch.as_padding().impression_negatives, expected)
    wide = BatchBuilder(ITEM_ONLY, impression_negatives=4)(table).impression_negatives
    assert wide.tolist() == [[-1, -1, -1, -1], [7, -1, -1, -1], [1, 2, 3, -1]]
    off = BatchBuilder(ITEM_ONLY)(table).impression_negatives
    assert off.shape == (3, 0) and off.dtype == torch.int64
    assert BatchBuilder(ITEM_ONLY)(
        table.drop([IMPRESSION_NEGATIVES])
    ).impression_negatives.shape == (
        3,
        0,
    )


def test_batch_builder_missing_impression_column_is_named() -> None:
    table = _hand_built_events().drop([IMPRESSION_NEGATIVES])
    with pytest.raises(SchemaError, match=f"missing column '{IMPRESSION_NEGATIVES}'"):
        BatchBuilder(ITEM_ONLY, impression_negatives=2)(table)
    with pytest.raises(ValueError, match="impression_negatives"):
        BatchBuilder(ITEM_ONLY, impression_negatives=-1)


def test_new_items_are_never_shown_before_their_launch(tmp_path: Path) -> None:
    """Cold-start worlds: an item launched at fraction f of the feed has no impression in an
    earlier session, and items launched after the train window have no train row."""
    world = WorldConfig(new_item_fraction=0.2, new_item_window=0.3)
    manifest = prepare_synthetic(
        users=200, items=300, events=20_000, seed=3, out=tmp_path, world=world
    )
    launch = np.load(tmp_path / manifest.extra["truth"]["item_launch"]["path"])
    assert 0.1 < (launch > 0).mean() < 0.3 and launch.max() < 1.0 and launch.min() == 0.0
    train = pa.concat_tables(pq.read_table(p) for p in manifest.split_paths(tmp_path, "train"))
    times = train.column("timestamp").to_numpy()
    items = train.column("item_id").to_numpy()
    sessions = manifest.extra["counts"]["impressions"] / world.positions
    session = (times - world.start_timestamp) // world.session_interval_s
    assert (launch[items] <= session / sessions + 1e-9).all()
    late = launch > session.max() / sessions
    assert late.any() and not np.isin(np.flatnonzero(late), items).any()
    launched_rows = np.isin(items, np.flatnonzero(launch > 0))
    assert launched_rows.any()  # new items do get traffic once launched
