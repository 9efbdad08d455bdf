"""Synthetic world: determinism, chunked generation, history against a sequential reference,
labels, positions, popularity skew and the logged ranker score."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.datasets.synthetic import prepare_synthetic
from data_pipeline.datasets.synthetic_world import WorldConfig
from data_pipeline.manifest import Manifest, sha256_file
from data_pipeline.schema import validate_arrow_schema

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
