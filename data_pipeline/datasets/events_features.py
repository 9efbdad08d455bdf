"""Features of a user's item and user tables (``twotower prepare events``), indexed by dense id.

* categorical columns: one value per row -> ids ``1..K`` in sorted order (0: unknown or absent),
  one embedding table per column, the vocabulary recorded in the manifest;
* list columns (an Arrow list, or a ``|``-separated string): a bag of vocabulary ids per row;
* text columns (item side): hashed word and bigram ids with idf weights in the shared
  ``text_tokens`` table (:mod:`data_pipeline.text`).

Feature names are the column names, prefixed ``item_`` / ``user_`` unless they already carry it.
Table rows whose key the (filtered) log does not contain are dropped; ids without a table row get
the unknown id 0 (an empty bag's single 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.datasets.event_features import text_spec
from data_pipeline.datasets.events_mapping import SideTableMapping
from data_pipeline.datasets.events_source import file_format, input_files, table_chunks
from data_pipeline.datasets.events_spill import IdMap
from data_pipeline.datasets.movielens_features import UNKNOWN, SideFeatures, vocabulary_ids
from data_pipeline.schema import (
    ITEM_ID,
    USER_ID,
    FeatureKind,
    FeatureSpec,
    SchemaError,
    Side,
    weights_column,
)
from data_pipeline.text import (
    DocumentFrequency,
    TextHashConfig,
    idf_weight_column,
    text_id_column,
)

LIST_SEPARATOR = "|"


@dataclass
class SideTableFeatures:
    """One side's features: columns by dense id, their specs, the text record."""

    features: SideFeatures
    specs: list[FeatureSpec] = field(default_factory=list)
    text: dict[str, Any] = field(default_factory=dict)


def feature_name(column: str, side: Side) -> str:
    prefix = "item_" if side is Side.ITEM else "user_"
    return column if column.startswith(prefix) else f"{prefix}{column}"


def side_table_features(
    mapping: SideTableMapping | None, side: Side, ids: IdMap, text_config: TextHashConfig
) -> SideTableFeatures:
    """``user_id`` / ``item_id`` plus the mapped columns of the side table (module docstring)."""
    n = len(ids)
    key_name = USER_ID if side is Side.USER else ITEM_ID
    features = SideFeatures(
        columns={key_name: np.arange(n, dtype=np.int64)}, table_sizes={key_name: n}
    )
    result = SideTableFeatures(features, [FeatureSpec(key_name, side, FeatureKind.ID, key_name)])
    if mapping is None:
        return result
    table, rows = _read_table(mapping, ids)
    for column in mapping.categorical:
        name = feature_name(column, side)
        values, vocabulary = vocabulary_ids(_strings(table.column(column)))
        dense = np.zeros(n, dtype=np.int64)
        dense[rows] = values
        _add(result, name, dense, len(vocabulary), vocabulary, FeatureKind.ID, side)
    for column in mapping.lists:
        name = feature_name(column, side)
        bags, vocabulary = _list_ids(table.column(column), rows, n)
        _add(result, name, bags, len(vocabulary), vocabulary, FeatureKind.IDS, side)
    for column in mapping.text:
        name = feature_name(column, side)
        texts = [""] * n
        for row, text in zip(rows.tolist(), _strings(table.column(column))):
            texts[row] = text
        token_ids = text_id_column(pa.array(texts, pa.string()), text_config)
        idf = DocumentFrequency.empty(text_config.vocab_size).update(token_ids).idf()
        features.columns[name] = token_ids
        features.columns[weights_column(name)] = idf_weight_column(token_ids, idf)
        result.specs.append(text_spec(name, side))
        result.text[name] = {
            "source": f"{mapping.path}: column {column!r}",
            "vocab_size": text_config.vocab_size,
            "max_tokens": text_config.max_tokens,
            "bigrams": text_config.bigrams,
            "weights": "idf over all items: log((1 + N) / (1 + df)) + 1",
            "distinct_ids": int(np.unique(token_ids.values.to_numpy()).size),
        }
    return result


def _add(
    result: SideTableFeatures,
    name: str,
    column: np.ndarray | pa.Array,
    size: int,
    vocabulary: list[str],
    kind: FeatureKind,
    side: Side,
) -> None:
    if name in result.features.columns:
        raise SchemaError(f"feature {name!r} is made twice; rename one of its columns")
    result.features.columns[name] = column
    result.features.table_sizes[name] = size
    result.features.vocabularies[name] = vocabulary
    result.specs.append(FeatureSpec(name, side, kind, name))


def _read_table(mapping: SideTableMapping, ids: IdMap) -> tuple[pa.Table, np.ndarray]:
    """The table's rows whose key is in ``ids``, and their [R] dense ids; a key twice is an error."""
    parts, keys, sources = [], [], []
    for path in input_files(mapping.path):
        for chunk in table_chunks(path, mapping.columns(), file_format(path)):
            key = chunk.table.column(mapping.key).combine_chunks()
            if key.null_count:
                bad = int(pc.indices_nonzero(pc.is_null(key))[0].as_py())
                raise SchemaError(f"{chunk.where(bad)}: column {mapping.key!r}: null key")
            parts.append(chunk.table)
            keys.append(pc.cast(key, pa.string()))
            sources.append(chunk)
    table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in mapping.columns()})
    raw = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
    dense = ids.dense(raw)
    known = dense >= 0
    counts = np.bincount(dense[known], minlength=len(ids))
    if (counts > 1).any():
        repeated = ids.raw[int(np.flatnonzero(counts > 1)[0])].as_py()
        raise SchemaError(f"{mapping.path}: key {repeated!r} of column {mapping.key!r} repeats")
    return table.filter(pa.array(known)), dense[known]


def _strings(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """Values as strings ("" for null)."""
    return [("" if v is None else str(v)) for v in column.to_pylist()]


def _list_ids(
    column: pa.ChunkedArray | pa.Array, rows: np.ndarray, n: int
) -> tuple[pa.Array, list[str]]:
    """[n] bags of vocabulary ids (``[0]`` where unknown) and the vocabulary."""
    values = column.to_pylist()
    bags = [
        [str(x) for x in v if x is not None and str(x)]
        if isinstance(v, list)
        else [x for x in ("" if v is None else str(v)).split(LIST_SEPARATOR) if x]
        for v in values
    ]
    vocabulary = sorted({x for bag in bags for x in bag})
    index = {x: i + 1 for i, x in enumerate(vocabulary)}
    per_id: list[list[int]] = [[UNKNOWN] for _ in range(n)]
    for row, bag in zip(rows.tolist(), bags):
        per_id[row] = sorted({index[x] for x in bag}) or [UNKNOWN]
    return pa.array(per_id, pa.list_(pa.int64())), ["<unknown>", *vocabulary]
