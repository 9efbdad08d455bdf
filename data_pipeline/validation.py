"""Value checks on each row group before it becomes tensors.

FBGEMM's table-batched embedding only warns on an out-of-range index and returns a zero
embedding, so ids are checked here, per row group, with an error that names file, row group and
column; the ``hash`` policy folds them into range instead. Labels must be finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.schema import EventSchema, FeatureKind, SchemaError, label_column


@dataclass(frozen=True)
class IdValidator:
    """Args:
    schema: event schema (which columns hold ids of which table).
    tables: table name -> number of rows.
    policy: ``"error"`` raises on an out-of-range id; ``"hash"`` maps it into range.
    """

    schema: EventSchema
    tables: dict[str, int]
    policy: str = "error"

    def __call__(self, table: pa.Table, path: str, row_group: int) -> pa.Table:
        for feature in self.schema.features:
            if feature.name not in table.column_names:
                continue
            size = self.tables[feature.table]
            column = table.column(feature.name)
            values = pc.list_flatten(column) if feature.kind is FeatureKind.IDS else column
            if len(values) == 0:
                continue
            if values.null_count:
                raise SchemaError(
                    f"{path}: row group {row_group}: column '{feature.name}' has "
                    f"{values.null_count} null ids"
                )
            bounds = pc.min_max(values)
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            if low >= 0 and high < size:
                continue
            if self.policy == "error":
                raise SchemaError(
                    f"{path}: row group {row_group}: column '{feature.name}' has ids in "
                    f"[{low}, {high}] outside table '{feature.table}' of size {size} "
                    f"(set data.id_policy=hash to fold them into range)"
                )
            index = table.column_names.index(feature.name)
            field = table.schema.field(index)
            # Keep the exact field (nullability, list child name) so row groups still concatenate.
            folded = _fold(column, size, feature.kind).cast(field.type)
            table = table.set_column(index, field, folded)
        self._check_labels(table, path, row_group)
        return table

    def _check_labels(self, table: pa.Table, path: str, row_group: int) -> None:
        for label in self.schema.labels:
            name = label_column(label)
            if name not in table.column_names:
                continue
            values = table.column(name).to_numpy()
            if not np.isfinite(values).all():
                bad = int((~np.isfinite(values)).sum())
                raise SchemaError(
                    f"{path}: row group {row_group}: column '{name}' has {bad} NaN/inf values"
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
