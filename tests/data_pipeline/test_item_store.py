"""Item feature store: lookups equal ``BatchBuilder`` on the same ``items/`` rows (tiny, synthetic,
and a shuffled partial corpus), unknown ids and bad files are errors naming them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import KeyedJaggedTensor

from data_pipeline.batch import BatchBuilder
from data_pipeline.datasets.synthetic import prepare_synthetic
from data_pipeline.feature_encoding import FeatureEncoding
from data_pipeline.item_store import ItemFeatureStore, gather_jagged
from data_pipeline.manifest import Manifest
from data_pipeline.schema import SchemaError, Side
from data_pipeline.shard_writer import ShardWriter
from tests.tiny_dataset import ITEMS, write_tiny_dataset


def _builder_kjt(root: Path, manifest: Manifest, ids: list[int]) -> KeyedJaggedTensor:
    """Reference: the ``items/`` rows of ``ids`` (in that order) through ``BatchBuilder``."""
    table = pa.concat_tables(pq.read_table(p) for p in manifest.split_paths(root, "items"))
    row_of = {item: row for row, item in enumerate(table["item_id"].to_pylist())}
    rows = table.take(pa.array([row_of[i] for i in ids], pa.int64()))
    schema = manifest.schema
    encoding = FeatureEncoding.from_manifest(manifest.counters, manifest.tables, schema.features)
    return BatchBuilder(schema, encoding=encoding)(rows).item_features


def _assert_same(got: KeyedJaggedTensor, expected: KeyedJaggedTensor) -> None:
    assert got.keys() == expected.keys()
    assert got.stride() == expected.stride()
    assert torch.equal(got.values(), expected.values())
    assert torch.equal(got.lengths(), expected.lengths())
    assert (got.weights_or_none() is None) == (expected.weights_or_none() is None)
    if got.weights_or_none() is not None:
        assert torch.equal(got.weights(), expected.weights())


def test_tiny_lookup_matches_batch_builder(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    store = ItemFeatureStore.load(root, manifest)
    ids = [5, 0, ITEMS - 1, 5, 17]  # unordered, repeated
    got = store.lookup(torch.tensor(ids))
    assert got.keys() == [f.name for f in manifest.schema.item_features()]
    _assert_same(got, _builder_kjt(root, manifest, ids))
    assert torch.equal(store.corpus_ids(), torch.arange(ITEMS))
    empty = store.lookup(torch.zeros(0, dtype=torch.int64))
    assert empty.stride() == 0 and empty.values().numel() == 0


def test_synthetic_lookup_matches_batch_builder(tmp_path: Path) -> None:
    manifest = prepare_synthetic(
        users=20, items=100, events=500, seed=1, out=tmp_path, history_length=3
    )
    store = ItemFeatureStore.load(tmp_path, manifest)
    ids = np.random.default_rng(0).integers(0, 100, 64).tolist()
    got = store.lookup(torch.tensor(ids))
    # Every feature kind rides along: weighted text, counters (bucket + dense weight), affinity.
    assert got.weights_or_none() is not None
    assert "item_text_tokens" in got.keys() and "item_view_count_1h" in got.keys()
    _assert_same(got, _builder_kjt(tmp_path, manifest, ids))
    assert torch.equal(store.corpus_ids(), torch.arange(100))


def _rewrite_items(root: Path, table: pa.Table, files: int = 2) -> Manifest:
    """Replace ``items/`` with ``table`` split over ``files`` files and update the manifest."""
    manifest = Manifest.load(root)
    for path in manifest.split_paths(root, "items"):
        path.unlink()
    rows_per_file = -(-table.num_rows // files)
    schema = manifest.schema.side_arrow_schema(Side.ITEM)
    with ShardWriter(root, "items", schema, rows_per_file, row_group_rows=7) as writer:
        writer.write(table)
    manifest.splits["items"] = writer.info
    manifest.save(root)
    return manifest


@pytest.fixture
def partial_corpus(tmp_path: Path) -> tuple[Path, Manifest, list[int]]:
    """Items in shuffled order over two files, 10 ids missing, tag lists of length 0 to 3."""
    root = write_tiny_dataset(tmp_path / "data")
    rng = np.random.default_rng(4)
    kept = rng.permutation(ITEMS)[: ITEMS - 10]
    tags = [rng.integers(0, 5, int(rng.integers(0, 4))).tolist() for _ in kept]
    table = pa.table(
        {"item_id": pa.array(kept, pa.int64()), "item_tags": pa.array(tags, pa.list_(pa.int64()))}
    )
    return root, _rewrite_items(root, table), sorted(kept.tolist())


def test_shuffled_partial_corpus(partial_corpus: tuple[Path, Manifest, list[int]]) -> None:
    root, manifest, kept = partial_corpus
    assert len(manifest.splits["items"].files) == 2
    store = ItemFeatureStore.load(root, manifest)
    assert store.corpus_ids().tolist() == kept
    ids = kept[::-1] + kept[:5]
    _assert_same(store.lookup(torch.tensor(ids)), _builder_kjt(root, manifest, ids))


def test_unknown_ids_are_named(partial_corpus: tuple[Path, Manifest, list[int]]) -> None:
    root, manifest, kept = partial_corpus
    store = ItemFeatureStore.load(root, manifest)
    missing = sorted(set(range(ITEMS)) - set(kept))[0]
    items_dir = str(root / "items")
    with pytest.raises(ValueError, match=rf"{items_dir}.*\[{missing}\]"):
        store.lookup(torch.tensor([kept[0], missing]))
    with pytest.raises(ValueError, match=rf"{items_dir}: 2 item ids.*\[-1, {ITEMS}\]"):
        store.lookup(torch.tensor([ITEMS, kept[0], -1]))
    with pytest.raises(ValueError, match="1-D"):
        store.lookup(torch.tensor([[kept[0]]]))


def test_bad_items_files_are_schema_errors(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    path = manifest.split_paths(root, "items")[0]
    pq.write_table(pq.read_table(path).drop(["item_tags"]), path)
    with pytest.raises(SchemaError, match=rf"{path.name}: missing column 'item_tags'"):
        ItemFeatureStore.load(root, manifest)
    repeated = pa.table({"item_id": [3, 3], "item_tags": pa.array([[1], [2]])})
    with pytest.raises(SchemaError, match=r"items: column 'item_id' repeats ids \[3\]"):
        ItemFeatureStore.load(root, _rewrite_items(root, repeated, files=1))
    outside = pa.table({"item_id": [3, ITEMS], "item_tags": pa.array([[1], [2]])})
    with pytest.raises(SchemaError, match=rf"items: column 'item_id' has ids outside.*\[{ITEMS}\]"):
        ItemFeatureStore.load(root, _rewrite_items(root, outside, files=1))


@settings(max_examples=50, deadline=None)
@given(
    segments=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5)), max_size=12),
)
def test_gather_jagged_matches_slices(segments: list[tuple[int, int]]) -> None:
    values = np.arange(100, 125)
    starts = np.array([s for s, _ in segments], dtype=np.int64)
    lengths = np.array([n for _, n in segments], dtype=np.int64)
    expected = [v for s, n in segments for v in values[s : s + n].tolist()]
    assert gather_jagged(starts, lengths, values).tolist() == expected
