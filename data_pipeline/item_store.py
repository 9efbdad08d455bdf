"""Item features by item id, so negatives sampled from the corpus meet the item tower with their
real features rather than an id alone.

The ``items/`` split is read once into arrays indexed by item id: a dense ``[num_items]`` array
per scalar (``ID``) feature and CSR offsets/values per jagged (``IDS``) feature. A lookup is then a
few numpy gathers, and gives the same ``KeyedJaggedTensor`` that ``BatchBuilder`` builds from the
same rows of ``items/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec import KeyedJaggedTensor

from data_pipeline.manifest import MANIFEST_NAME, Manifest
from data_pipeline.schema import (
    ITEM_ID,
    FeatureKind,
    FeatureSpec,
    SchemaError,
    Side,
    validate_arrow_schema,
)

ITEMS_SPLIT = "items"
SHOWN_IDS = 8


@dataclass(frozen=True)
class JaggedColumn:
    """One feature indexed by item id.

    Args:
        offsets: [num_items + 1] int64; item i holds ``values[offsets[i]:offsets[i + 1]]``.
            None for a scalar (``ID``) feature, whose ``values`` is then [num_items].
        values: [sum(lengths)] int64 (jagged) or [num_items] int64 (scalar).
    """

    offsets: np.ndarray | None
    values: np.ndarray


def gather_jagged(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Concatenate ``values[starts[j] : starts[j] + lengths[j]]`` over j, without a Python loop.

    Args:
        starts, lengths: [n] int64.
        values: [V] any dtype.

    Returns:
        [sum(lengths)] values, segment j after segment j - 1.
    """
    out_starts = np.cumsum(lengths) - lengths
    index = np.repeat(starts - out_starts, lengths) + np.arange(int(lengths.sum()))
    return values[index]


@dataclass(frozen=True)
class ItemFeatureStore:
    """Every item feature of the corpus, indexed by item id.

    Args:
        items_dir: the ``items/`` directory read (named in errors).
        features: item-side features in ``manifest.schema.item_features()`` order (KJT keys).
        present: [num_items] bool, whether ``items/`` has a row for the id.
        columns: feature name -> its values by item id (``item_id`` itself is not stored).
    """

    items_dir: Path
    features: tuple[FeatureSpec, ...]
    present: np.ndarray
    columns: dict[str, JaggedColumn]

    @property
    def num_items(self) -> int:
        return int(self.present.shape[0])

    @staticmethod
    def load(root: str | Path, manifest: Manifest) -> ItemFeatureStore:
        """Read ``<root>/items/`` (every file the manifest lists) into id-indexed arrays.

        Raises:
            SchemaError: a file lacks a column or has a wrong type (naming file and column), the
                manifest has no ``item_id`` table, or an item id is out of range or repeated.
        """
        items_dir = Path(root) / ITEMS_SPLIT
        if ITEM_ID not in manifest.tables:
            raise SchemaError(
                f"{Path(root) / MANIFEST_NAME}: no '{ITEM_ID}' table (have {sorted(manifest.tables)})"
            )
        expected = manifest.schema.side_arrow_schema(Side.ITEM)
        tables = []
        for path in manifest.split_paths(root, ITEMS_SPLIT):
            validate_arrow_schema(pq.read_schema(path), expected, path)
            tables.append(pq.read_table(path, columns=expected.names))
        table = (
            pa.concat_tables(tables, promote_options="permissive")
            if tables
            else expected.empty_table()
        )
        num_items = manifest.tables[ITEM_ID]
        ids = _item_ids(table, num_items, items_dir)
        present = np.zeros(num_items, dtype=bool)
        present[ids] = True
        features = manifest.schema.item_features()
        columns = {
            f.name: _index_by_id(table, f, ids, num_items, items_dir)
            for f in features
            if f.name != ITEM_ID
        }
        return ItemFeatureStore(items_dir, features, present, columns)

    def corpus_ids(self) -> torch.Tensor:
        """[N] int64, the ids that have a row in ``items/``, ascending."""
        return torch.from_numpy(np.flatnonzero(self.present).astype(np.int64))

    def lookup(self, ids: torch.Tensor) -> KeyedJaggedTensor:
        """Item features of ``ids``, as ``BatchBuilder`` gives them for the same ``items/`` rows.

        Args:
            ids: [n] int64 item ids (any device; repeats allowed).

        Returns:
            KJT on ``ids.device`` with stride n and keys ``[f.name for f in features]``; each
            key's lengths are [n] and its values jagged ``[sum(lengths)]`` int64.

        Raises:
            ValueError: naming a few ids that are out of range or have no row in ``items/``.
        """
        if ids.dim() != 1:
            raise ValueError(
                f"ItemFeatureStore.lookup: ids must be 1-D [n], got {tuple(ids.shape)}"
            )
        wanted = ids.detach().cpu().numpy().astype(np.int64, copy=False)
        self._check_known(wanted)
        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for feature in self.features:
            column = self.columns.get(feature.name)
            if column is None:  # item_id: the ids themselves
                values.append(wanted)
                lengths.append(np.ones_like(wanted))
            elif column.offsets is None:
                values.append(column.values[wanted])
                lengths.append(np.ones_like(wanted))
            else:
                starts = column.offsets[wanted]
                counts = column.offsets[wanted + 1] - starts
                values.append(gather_jagged(starts, counts, column.values))
                lengths.append(counts)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in self.features],
            values=torch.from_numpy(np.concatenate(values) if values else wanted[:0]),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else wanted[:0]),
        )
        return kjt if ids.device.type == "cpu" else kjt.to(ids.device)

    def _check_known(self, ids: np.ndarray) -> None:
        inside = (ids >= 0) & (ids < self.num_items)
        known = inside.copy()
        known[inside] = self.present[ids[inside]]
        if known.all():
            return
        bad = np.unique(ids[~known])
        raise ValueError(
            f"{self.items_dir}: {bad.shape[0]} item ids have no row in the items table "
            f"(ids must be in [0, {self.num_items}) and listed there): "
            f"{bad[:SHOWN_IDS].tolist()}{' ...' if bad.shape[0] > SHOWN_IDS else ''}"
        )


def _item_ids(table: pa.Table, num_items: int, items_dir: Path) -> np.ndarray:
    """[rows] int64 item ids of ``items/``, checked in range and unique."""
    ids = table.column(ITEM_ID).to_numpy().astype(np.int64, copy=False)
    outside = ids[(ids < 0) | (ids >= num_items)]
    if outside.shape[0]:
        raise SchemaError(
            f"{items_dir}: column '{ITEM_ID}' has ids outside table '{ITEM_ID}' of size "
            f"{num_items}: {np.unique(outside)[:SHOWN_IDS].tolist()}"
        )
    counts = np.bincount(ids, minlength=num_items)
    if (counts > 1).any():
        raise SchemaError(
            f"{items_dir}: column '{ITEM_ID}' repeats ids "
            f"{np.flatnonzero(counts > 1)[:SHOWN_IDS].tolist()}"
        )
    return ids


def _index_by_id(
    table: pa.Table, feature: FeatureSpec, ids: np.ndarray, num_items: int, items_dir: Path
) -> JaggedColumn:
    """One feature column of ``items/`` rearranged so that item id i sits at index i."""
    column = table.column(feature.name).combine_chunks()
    flat = pc.list_flatten(column) if feature.kind is FeatureKind.IDS else column
    if flat.null_count:
        raise SchemaError(f"{items_dir}: column '{feature.name}' has {flat.null_count} null ids")
    values = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if feature.kind is FeatureKind.ID:
        by_id = np.zeros(num_items, dtype=np.int64)
        by_id[ids] = values
        return JaggedColumn(offsets=None, values=by_id)
    row_lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    row_lengths = row_lengths.astype(np.int64, copy=False)
    row_starts = np.cumsum(row_lengths) - row_lengths
    lengths = np.zeros(num_items, dtype=np.int64)
    lengths[ids] = row_lengths
    offsets = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Rows in id order; ids absent from items/ contribute empty segments.
    order = np.argsort(ids, kind="stable")
    by_id = gather_jagged(row_starts[order], row_lengths[order], values)
    return JaggedColumn(offsets=offsets, values=by_id)
