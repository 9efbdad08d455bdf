"""Item features by item id, so negatives sampled from the corpus meet the item tower with their
real features rather than an id alone.

The ``items/`` split is read once into one Arrow table with a row index by item id. A lookup takes
the rows of the wanted ids and encodes them with :func:`data_pipeline.feature_encoding.encode_kjt`,
so it gives the same ``KeyedJaggedTensor`` (weights and counters included) that ``BatchBuilder``
builds from the same rows of ``items/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec import KeyedJaggedTensor

from data_pipeline.feature_encoding import FeatureEncoding, encode_kjt, needs_weights
from data_pipeline.manifest import MANIFEST_NAME, Manifest
from data_pipeline.schema import (
    ITEM_ID,
    EventSchema,
    FeatureSpec,
    SchemaError,
    Side,
    validate_arrow_schema,
)

ITEMS_SPLIT = "items"
SHOWN_IDS = 8


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
        features: item-side features (KJT keys, in order).
        present: [num_items] bool, whether ``items/`` has a row for the id.
        table: the ``items/`` rows.
        row_of: [num_items] int64, the row of ``table`` holding each id (-1: none).
        encoding: counter statistics and weight normalization, as the batches use them.
        weighted: KJTs carry weights (same rule as the batches').
    """

    items_dir: Path
    features: tuple[FeatureSpec, ...]
    present: np.ndarray
    table: pa.Table
    row_of: np.ndarray
    encoding: FeatureEncoding
    weighted: bool

    @property
    def num_items(self) -> int:
        return int(self.present.shape[0])

    @staticmethod
    def load(
        root: str | Path,
        manifest: Manifest,
        schema: EventSchema | None = None,
        encoding: FeatureEncoding | None = None,
    ) -> ItemFeatureStore:
        """Read ``<root>/items/`` (every file the manifest lists).

        Args:
            schema: the model-facing schema whose item features to give (default: the
                manifest's); KJTs carry weights when any of its features needs them.
            encoding: default: the manifest's counter statistics, no weight normalization.

        Raises:
            SchemaError: a file lacks a column or has a wrong type (naming file and column), the
                manifest has no ``item_id`` table, or an item id is out of range or repeated.
        """
        items_dir = Path(root) / ITEMS_SPLIT
        if ITEM_ID not in manifest.tables:
            raise SchemaError(
                f"{Path(root) / MANIFEST_NAME}: no '{ITEM_ID}' table (have {sorted(manifest.tables)})"
            )
        schema = schema or manifest.schema
        features = schema.item_features()
        if encoding is None:
            encoding = FeatureEncoding.from_manifest(manifest.counters, manifest.tables, features)
        stored = manifest.schema.side_arrow_schema(Side.ITEM)
        wanted = {ITEM_ID} | {c.name for f in features for c in f.arrow_fields()}
        expected = pa.schema([f for f in stored if f.name in wanted])
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
        row_of = np.full(num_items, -1, dtype=np.int64)
        row_of[ids] = np.arange(len(ids), dtype=np.int64)
        return ItemFeatureStore(
            items_dir, features, present, table, row_of, encoding, needs_weights(schema.features)
        )

    def corpus_ids(self) -> torch.Tensor:
        """[N] int64, the ids that have a row in ``items/``, ascending."""
        return torch.from_numpy(np.flatnonzero(self.present).astype(np.int64))

    def lookup(self, ids: torch.Tensor) -> KeyedJaggedTensor:
        """Item features of ``ids``, as ``BatchBuilder`` gives them for the same ``items/`` rows.

        Args:
            ids: [n] int64 item ids (any device; repeats allowed).

        Returns:
            KJT on ``ids.device`` with stride n and keys ``[f.name for f in features]``; each
            key's lengths are [n] and its values jagged ``[sum(lengths)]`` int64 (with weights
            ``[sum(lengths)]`` float32 when ``weighted``).

        Raises:
            ValueError: naming a few ids that are out of range or have no row in ``items/``.
        """
        if ids.dim() != 1:
            raise ValueError(
                f"ItemFeatureStore.lookup: ids must be 1-D [n], got {tuple(ids.shape)}"
            )
        wanted = ids.detach().cpu().numpy().astype(np.int64, copy=False)
        self._check_known(wanted)
        rows = self.table.take(pa.array(self.row_of[wanted]))
        kjt = encode_kjt(rows, self.features, self.encoding, self.weighted)
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
