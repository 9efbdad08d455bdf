"""Value checks on each row group before it becomes tensors.

FBGEMM's table-batched embedding only warns on an out-of-range index and returns a zero
embedding, so ids are checked here, per row group, with an error that names file, row group and
column; the ``hash`` policy folds them into range instead. Labels must be finite. Counter columns
hold raw counts, not ids (their bucket id is computed from the count), so they are only checked to
be non-negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.schema import (
    IMPRESSION_NEGATIVES,
    ITEM_ID,
    RANKER_SCORE,
    EventSchema,
    FeatureKind,
    SchemaError,
    label_column,
)


@dataclass(frozen=True)
class IdValidator:
    """Args:
    schema: event schema (which columns hold ids of which table).
    tables: table name -> number of rows.
    policy: ``"error"`` raises on an out-of-range id; ``"hash"`` maps it into range.
    policies: per-column policy overriding ``policy`` (``features.columns.<f>.id_policy``).
    """

    schema: EventSchema
    tables: dict[str, int]
    policy: str = "error"
    policies: Mapping[str, str] = field(default_factory=dict)

    def id_columns(self) -> list[tuple[str, FeatureKind, str]]:
        """(column, kind, table) of every column holding embedding-table ids (not counters)."""
        columns: list[tuple[str, FeatureKind, str]] = [
            (f.name, f.kind, f.table)
            for f in self.schema.features
            if f.kind is not FeatureKind.COUNTER
        ]
        if self.schema.has_impression_negatives:
            columns.append((IMPRESSION_NEGATIVES, FeatureKind.IDS, ITEM_ID))
        return columns

    def __call__(self, table: pa.Table, path: str, row_group: int) -> pa.Table:
        for name, kind, table_name in self.id_columns():
            if name not in table.column_names:
                continue
            size = self.tables[table_name]
            column = table.column(name)
            values = pc.list_flatten(column) if kind is FeatureKind.IDS else column
            if len(values) == 0:
                continue
            if values.null_count:
                raise SchemaError(
                    f"{path}: row group {row_group}: column '{name}' has "
                    f"{values.null_count} null ids"
                )
            bounds = pc.min_max(values)
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            if low >= 0 and high < size:
                continue
            if self.policies.get(name, self.policy) == "error":
                raise SchemaError(
                    f"{path}: row group {row_group}: column '{name}' has ids in "
                    f"[{low}, {high}] outside table '{table_name}' of size {size} "
                    f"(set data.id_policy=hash or features.columns.{name}.id_policy=hash to "
                    "fold them into range)"
                )
            index = table.column_names.index(name)
            field = table.schema.field(index)
            # Keep the exact field (nullability, list child name) so row groups still concatenate.
            folded = _fold(column, size, kind).cast(field.type)
            table = table.set_column(index, field, folded)
        self._check_floats(table, path, row_group)
        self._check_counters(table, path, row_group)
        return table

    def _check_counters(self, table: pa.Table, path: str, row_group: int) -> None:
        for feature in self.schema.features:
            if feature.kind is not FeatureKind.COUNTER or feature.name not in table.column_names:
                continue
            column = table.column(feature.name)
            if column.null_count or (len(column) and pc.min(column).as_py() < 0):
                raise SchemaError(
                    f"{path}: row group {row_group}: counter column '{feature.name}' must hold "
                    f"non-negative counts without nulls"
                )

    def _check_floats(self, table: pa.Table, path: str, row_group: int) -> None:
        """Labels must be finite (a null reads as NaN); ``ranker_score`` must not be inf."""
        checks = [(label_column(label), True) for label in self.schema.labels]
        checks.append((RANKER_SCORE, False))
        for name, nan_is_bad in checks:
            if name not in table.column_names:
                continue
            values = table.column(name).to_numpy().astype(np.float64)
            bad = ~np.isfinite(values) if nan_is_bad else np.isinf(values)
            if bad.any():
                what = "NaN/inf" if nan_is_bad else "inf"
                raise SchemaError(
                    f"{path}: row group {row_group}: column '{name}' has {int(bad.sum())} "
                    f"{what} values (first at row {int(np.argmax(bad))} of the row group)"
                )


def _fold(column: pa.ChunkedArray, size: int, kind: FeatureKind) -> pa.Array:
    """Map ids into ``[0, size)`` with a fixed multiplicative hash (stable across runs)."""
    array = column.combine_chunks()

    def fold(values: np.ndarray) -> np.ndarray:
        mixed = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (mixed % np.uint64(size)).astype(np.int64)

    if kind is FeatureKind.ID:
        raw = array.to_numpy(zero_copy_only=False)
        inside = (raw >= 0) & (raw < size)
        return pa.array(np.where(inside, raw, fold(raw)), type=pa.int64())
    flat = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    inside = (flat >= 0) & (flat < size)
    folded = pa.array(np.where(inside, flat, fold(flat)), type=pa.int64())
    offsets = pc.subtract(array.offsets, array.offsets[0])
    return pa.ListArray.from_arrays(offsets, folded)
