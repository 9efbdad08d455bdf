"""Row-group value checks: ids in range (every id column, error / hash policy), finite floats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.datasets.event_features import counter_spec
from data_pipeline.loader import LoaderSpec, build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.schema import RANKER_SCORE, EventSchema, SchemaError
from data_pipeline.validation import IdValidator
from tests.tiny_dataset import ITEMS, write_tiny_dataset


def _first_row_group(tmp_path: Path) -> tuple[pa.Table, IdValidator]:
    """Row group 0 of the tiny train split (with impression negatives) and its validator."""
    root = write_tiny_dataset(tmp_path / "data", impressions=True)
    manifest = Manifest.load(root)
    table = pq.ParquetFile(manifest.split_paths(root, "train")[0]).read_row_group(0)
    return table, IdValidator(manifest.schema, manifest.tables)


def _replace(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    index = table.column_names.index(name)
    return table.set_column(index, table.schema.field(index), column.cast(table[name].type))


def _with_list_value(table: pa.Table, name: str, value: int | None) -> pa.Table:
    """``name`` (list<int64>) with ``value`` appended to row 3's list."""
    rows = table[name].to_pylist()
    rows[3] = [*rows[3], value]
    return _replace(table, name, pa.array(rows, pa.list_(pa.int64())))


def test_clean_row_group_passes_unchanged(tmp_path: Path) -> None:
    table, validator = _first_row_group(tmp_path)
    assert validator(table, "f.parquet", 0).equals(table)


@pytest.mark.parametrize("column", ["impression_negative_ids", "hist_item_ids"])
def test_out_of_range_id_in_list_column_names_column_and_table(tmp_path: Path, column: str) -> None:
    table, validator = _first_row_group(tmp_path)
    bad = _with_list_value(table, column, ITEMS + 5)
    with pytest.raises(
        SchemaError,
        match=rf"f.parquet: row group 2: column '{column}' has ids in \[0, {ITEMS + 5}\] "
        rf"outside table 'item_id' of size {ITEMS}",
    ):
        validator(bad, "f.parquet", 2)


def test_negative_impression_id_is_out_of_range(tmp_path: Path) -> None:
    table, validator = _first_row_group(tmp_path)
    with pytest.raises(SchemaError, match=r"column 'impression_negative_ids' has ids in \[-1,"):
        validator(_with_list_value(table, "impression_negative_ids", -1), "f.parquet", 0)


def test_null_inside_impression_list_is_reported(tmp_path: Path) -> None:
    table, validator = _first_row_group(tmp_path)
    with pytest.raises(SchemaError, match=r"column 'impression_negative_ids' has 1 null ids"):
        validator(_with_list_value(table, "impression_negative_ids", None), "f.parquet", 0)


@pytest.mark.parametrize("column", ["impression_negative_ids", "hist_item_ids"])
def test_hash_policy_folds_list_ids_into_range_keeping_lengths(tmp_path: Path, column: str) -> None:
    table, validator = _first_row_group(tmp_path)
    bad = _with_list_value(table, column, 10**9)
    hashed = IdValidator(validator.schema, validator.tables, "hash")(bad, "f.parquet", 0)
    before, after = bad[column].to_pylist(), hashed[column].to_pylist()
    assert [len(x) for x in after] == [len(x) for x in before]
    assert all(0 <= v < ITEMS for row in after for v in row)
    assert after[:3] == before[:3] and after[3][:-1] == before[3][:-1]  # in-range ids unchanged
    assert hashed.schema.equals(table.schema)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, None])
def test_non_finite_label_names_file_row_group_and_column(
    tmp_path: Path, value: float | None
) -> None:
    table, validator = _first_row_group(tmp_path)
    labels = table["label_like"].to_pylist()
    labels[5] = value
    bad = _replace(table, "label_like", pa.array(labels, pa.float32()))
    with pytest.raises(
        SchemaError,
        match=r"f.parquet: row group 1: column 'label_like' has 1 NaN/inf values "
        r"\(first at row 5",
    ):
        validator(bad, "f.parquet", 1)


def test_ranker_score_rejects_inf_but_keeps_unknown(tmp_path: Path) -> None:
    table, validator = _first_row_group(tmp_path)
    scores = np.linspace(0, 1, table.num_rows).astype(np.float32)
    scores[0] = np.nan  # NaN and null both mean "not logged"
    column = pa.array(scores, pa.float32(), mask=np.arange(table.num_rows) == 1)
    known = table.append_column(RANKER_SCORE, column)
    assert validator(known, "f.parquet", 0) is known  # (NaN != NaN defeats Table.equals)
    scores[2] = np.inf
    bad = table.append_column(RANKER_SCORE, pa.array(scores, pa.float32()))
    with pytest.raises(SchemaError, match=r"row group 4: column 'ranker_score' has 1 inf values"):
        validator(bad, "f.parquet", 4)


def test_loader_reports_bad_impression_id_with_file_and_row_group(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", impressions=True)
    path = Manifest.load(root).split_paths(root, "train")[1]
    table = pq.read_table(path)
    negatives = table["impression_negative_ids"].to_pylist()
    negatives[70] = [ITEMS]  # row 70: row group 1 of 64-row groups
    fixed = _replace(table, "impression_negative_ids", pa.array(negatives, pa.list_(pa.int64())))
    pq.write_table(fixed, path, row_group_size=64)
    spec = LoaderSpec(root=str(root), split="train", batch_size=64)
    with pytest.raises(
        SchemaError, match=rf"{path.name}: row group 1: column 'impression_negative_ids'"
    ):
        list(build_event_loader(spec, Manifest.load(root), 0, 1))


def test_counters_are_counts_not_table_ids() -> None:
    schema = EventSchema(features=(counter_spec("item_rating_count_1d"),), labels=("click",))
    validator = IdValidator(schema, {"item_rating_count_1d": 24})
    assert validator.id_columns() == []
    large = pa.table({"item_rating_count_1d": pa.array([0, 1000], pa.int64())})
    assert validator(large, "f.parquet", 0).equals(large)  # counts above the 24 buckets are fine
    negative = pa.table({"item_rating_count_1d": pa.array([3, -1], pa.int64())})
    with pytest.raises(SchemaError, match="f.parquet: row group 2: counter column"):
        validator(negative, "f.parquet", 2)
