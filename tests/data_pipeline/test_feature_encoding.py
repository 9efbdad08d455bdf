"""Feature encoding: counters become bucket id + normalized dense weight, weighted ids carry
their stored weights (row-normalized when mean-pooled), bad columns are errors naming them, and
the item store encodes exactly like the batches (weights included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from config import load_config
from data_pipeline.counters import counter_bucket
from data_pipeline.feature_encoding import (
    FeatureEncoding,
    encode_feature,
    encode_kjt,
    needs_weights,
)
from data_pipeline.manifest import Manifest
from data_pipeline.schema import FeatureKind, FeatureSpec, SchemaError, Side
from tests.tiny_movielens import write_tiny_movielens
from trainer.build import batch_builder, item_store

TEXT = "item_title_tokens"
WEIGHTED = FeatureSpec("tags", Side.ITEM, FeatureKind.IDS, "tags", weighted=True)
COUNTER = FeatureSpec("views", Side.ITEM, FeatureKind.COUNTER, "views")


@pytest.fixture(scope="module")
def movielens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, pa.Table]:
    root = write_tiny_movielens(tmp_path_factory.mktemp("ml"))
    return root, Manifest.load(root), pq.read_table(root / "items")


def _features(manifest: Manifest) -> dict[str, FeatureSpec]:
    return {f.name: f for f in manifest.schema.item_features()}


def test_counters_encode_bucket_ids_and_normalized_counts(movielens) -> None:  # type: ignore[no-untyped-def]
    _, manifest, items = movielens
    specs = _features(manifest)
    encoding = FeatureEncoding.from_manifest(
        manifest.counters, manifest.tables, list(specs.values())
    )
    counters = [f for f in specs.values() if f.kind is FeatureKind.COUNTER]
    assert len(counters) == 6
    nonzero = 0
    for feature in counters:
        counts = items[feature.name].to_numpy()
        encoded = encode_feature(items, feature, encoding)
        stats = manifest.counters[feature.name]
        np.testing.assert_array_equal(encoded.lengths, np.ones(len(counts)))
        np.testing.assert_array_equal(encoded.values, counter_bucket(counts, 24))
        expected = (np.log1p(counts) - stats["mean"]) / stats["std"]
        np.testing.assert_allclose(encoded.weights, expected, rtol=1e-5, atol=1e-6)
        nonzero += int((counts > 0).sum())
    assert nonzero > 0


def test_counter_buckets_are_log2_and_clipped_to_the_table() -> None:
    counts = np.array([0, 1, 2, 3, 4, 7, 8, 1000, 10**9])
    table = pa.table({"views": counts})
    encoding = FeatureEncoding({"views": (1.0, 2.0)}, {"views": 24})
    encoded = encode_feature(table, COUNTER, encoding)
    assert encoded.values.tolist() == [0, 1, 2, 2, 3, 3, 4, 10, 23]
    np.testing.assert_allclose(encoded.weights, (np.log1p(counts) - 1.0) / 2.0, rtol=1e-6)


def test_negative_counts_raise() -> None:
    encoding = FeatureEncoding({"views": (0.0, 1.0)}, {"views": 8})
    with pytest.raises(SchemaError, match="'views'.*negative"):
        encode_feature(pa.table({"views": [3, -1]}), COUNTER, encoding)


def test_weighted_ids_carry_their_stored_weights(movielens) -> None:  # type: ignore[no-untyped-def]
    _, manifest, items = movielens
    specs = _features(manifest)
    kjt = encode_kjt(
        items,
        list(specs.values()),
        FeatureEncoding.from_manifest(manifest.counters, manifest.tables, list(specs.values())),
        weighted=True,
    )
    text = kjt[TEXT]
    stored = items[f"{TEXT}_weights"].to_pylist()
    assert text.values().tolist() == [t for row in items[TEXT].to_pylist() for t in row]
    assert text.weights().tolist() == pytest.approx([w for row in stored for w in row])
    assert len({w for row in stored for w in row}) > 1  # idf differs: the check can tell
    for plain in ("item_id", "genres", "year_bucket"):
        assert torch.equal(kjt[plain].weights(), torch.ones_like(kjt[plain].weights()))
    assert (
        encode_kjt(items, [specs[TEXT]], FeatureEncoding(), weighted=False).weights_or_none()
        is None
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(0.125, 100.0, width=32), min_size=0, max_size=5), min_size=1, max_size=8
    )
)
def test_mean_weighted_rows_sum_to_one(rows: list[list[float]]) -> None:
    table = pa.table(
        {
            "tags": pa.array([list(range(len(r))) for r in rows], pa.list_(pa.int64())),
            "tags_weights": pa.array(rows, pa.list_(pa.float32())),
        }
    )
    encoded = encode_feature(table, WEIGHTED, FeatureEncoding(mean_weighted=frozenset({"tags"})))
    assert encoded.lengths.tolist() == [len(r) for r in rows]
    start = 0
    for row in rows:
        got = encoded.weights[start : start + len(row)]
        start += len(row)
        if row:
            expected = np.asarray(row, np.float32) / np.float32(sum(row))
            np.testing.assert_allclose(got, expected, rtol=1e-5)
            assert got.sum() == pytest.approx(1.0, rel=1e-5)
    assert start == len(encoded.weights)


def test_mean_weighted_all_zero_row_stays_zero() -> None:
    table = pa.table(
        {
            "tags": pa.array([[1, 2], [], [3]], pa.list_(pa.int64())),
            "tags_weights": pa.array([[0.0, 0.0], [], [4.0]], pa.list_(pa.float32())),
        }
    )
    encoded = encode_feature(table, WEIGHTED, FeatureEncoding(mean_weighted=frozenset({"tags"})))
    assert encoded.weights.tolist() == [0.0, 0.0, 1.0]


def test_misaligned_or_missing_weights_raise() -> None:
    ids = pa.array([[1, 2], [3]], pa.list_(pa.int64()))
    misaligned = pa.table(
        {"tags": ids, "tags_weights": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))}
    )
    with pytest.raises(SchemaError, match=r"'tags_weights' is not aligned with 'tags': row 1"):
        encode_feature(misaligned, WEIGHTED, FeatureEncoding())
    with pytest.raises(SchemaError, match="missing weights column 'tags_weights'"):
        encode_feature(pa.table({"tags": ids}), WEIGHTED, FeatureEncoding())


def test_needs_weights_rule() -> None:
    plain = FeatureSpec("tags", Side.ITEM, FeatureKind.IDS, "tags")
    item = FeatureSpec("item_id", Side.ITEM, FeatureKind.ID, "item_id")
    assert not needs_weights([item, plain])
    assert not needs_weights([])
    assert needs_weights([item, WEIGHTED])
    assert needs_weights([COUNTER])


def test_item_store_lookup_equals_batches_with_weights(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest, items = movielens
    config = load_config(None, [f"data.path={root}"])
    ids = [4, 0, 5, 4, 2, 1, 3]  # unordered, repeated, every item
    row_of = {item: row for row, item in enumerate(items["item_id"].to_pylist())}
    expected = batch_builder(manifest, config)(items.take([row_of[i] for i in ids])).item_features
    got = item_store(manifest, config).lookup(torch.tensor(ids))
    assert got.keys() == expected.keys() == list(_features(manifest))
    assert torch.equal(got.values(), expected.values())
    assert torch.equal(got.lengths(), expected.lengths())
    assert got.weights_or_none() is not None
    assert torch.equal(got.weights(), expected.weights())
    # The configured encoding reached both: mean-pooled text weights are row-normalized.
    text = got[TEXT]
    sums = torch.zeros(len(ids)).index_add(
        0, torch.repeat_interleave(torch.arange(len(ids)), text.lengths()), text.weights()
    )
    nonempty = text.lengths() > 0
    assert nonempty.any()
    assert torch.allclose(sums[nonempty], torch.ones(int(nonempty.sum())))


def _events(rows: int) -> pa.Table:
    rng = np.random.default_rng(7)
    return pa.table(
        {
            "user_id": rng.integers(0, 50, rows),
            "item_id": rng.integers(0, 80, rows),
            "timestamp": np.arange(rows, dtype=np.int64) * 13,
            "tags": pa.array([[1, 2, 3][: i % 4] for i in range(rows)], pa.list_(pa.int64())),
        }
    )


def test_dropout_empties_a_deterministic_share_of_bags() -> None:
    table = _events(4000)
    item = FeatureSpec("item_id", Side.ITEM, FeatureKind.ID, "item_id")
    tags = FeatureSpec("tags", Side.ITEM, FeatureKind.IDS, "tags")
    plain = encode_feature(table, item, FeatureEncoding())
    dropped = encode_feature(table, item, FeatureEncoding(dropout={"item_id": 0.25}))
    share = 1 - dropped.lengths.mean()
    assert 0.22 < share < 0.28 and set(np.unique(dropped.lengths)) == {0, 1}
    kept = dropped.lengths == 1
    assert np.array_equal(dropped.values, plain.values[kept])  # survivors keep their ids
    again = encode_feature(table, item, FeatureEncoding(dropout={"item_id": 0.25}))
    assert np.array_equal(again.lengths, dropped.lengths)  # a pure function of the row
    # Another seed or another feature drops other rows; a row's choice does not depend on the
    # rows around it (a shuffled batch drops the same rows).
    other_seed = encode_feature(
        table, item, FeatureEncoding({}, {}, frozenset(), {"item_id": 0.25}, 1)
    )
    assert not np.array_equal(other_seed.lengths, dropped.lengths)
    order = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = encode_feature(table.take(order), item, FeatureEncoding(dropout={"item_id": 0.25}))
    assert np.array_equal(shuffled.lengths, dropped.lengths[order])
    bags = encode_feature(table, tags, FeatureEncoding(dropout={"tags": 0.5}))
    full = encode_feature(table, tags, FeatureEncoding())
    emptied = (bags.lengths == 0) & (full.lengths > 0)
    assert emptied.any() and np.array_equal(bags.lengths[~emptied], full.lengths[~emptied])
    assert len(bags.values) == len(bags.weights) == bags.lengths.sum()
