"""Shared output steps of the dataset converters: clearing stale shards, side tables, side files."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.manifest import EVENT_SPLITS, MANIFEST_NAME, SIDE_SPLITS, SplitInfo, sha256_file
from data_pipeline.schema import EventSchema, Side
from data_pipeline.shard_writer import ShardWriter

logger = logging.getLogger(__name__)

MIN_ROW_GROUPS = 8
MIN_ROW_GROUP_ROWS = 64


def clear_output(out: Path, extra_dirs: tuple[str, ...] = ()) -> None:
    """Remove a previous run's manifest and shards so no stale file survives a rewrite.

    Only the converter's own files are touched: ``manifest.json``, ``<split>/part-*.parquet``
    and ``*.parquet`` / ``*.npy`` directly inside ``extra_dirs``.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in EVENT_SPLITS + SIDE_SPLITS:
        for path in (out / split).glob("part-*.parquet*"):
            path.unlink()
    for directory in extra_dirs:
        for pattern in ("*.parquet", "*.npy"):
            for path in (out / directory).glob(pattern):
                path.unlink()


def write_side_table(
    out: Path,
    schema: EventSchema,
    side: Side,
    columns: dict[str, np.ndarray | pa.Array],
    row_group_rows: int,
) -> SplitInfo:
    """Write ``items/`` or ``users/``: the id plus every feature of that side, one row per id."""
    arrow_schema = schema.side_arrow_schema(side)
    table = pa.table({name: columns[name] for name in arrow_schema.names})
    split = "items" if side is Side.ITEM else "users"
    with ShardWriter(out, split, arrow_schema, row_group_rows=row_group_rows) as writer:
        writer.write(table)
    return writer.info


def write_side_file(out: Path, relative: str, table: pa.Table) -> dict[str, str]:
    """A Parquet file outside the splits (raw-id maps); returns ``{path, sha256}``."""
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return {"path": relative, "sha256": sha256_file(path)}


def save_array(out: Path, relative: str, array: np.ndarray) -> dict[str, str]:
    """A ``.npy`` file (ground truth of a synthetic world); returns ``{path, sha256}``."""
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array, allow_pickle=False)
    return {"path": relative, "sha256": sha256_file(path)}


def split_row_group_rows(rows: int, row_group_rows: int) -> int:
    """Row-group size for a split of ``rows`` rows: at most ``row_group_rows``, but small
    enough that the split has at least :data:`MIN_ROW_GROUPS` units of work (the 943-row
    ml-100k valid/test splits would otherwise be one unit, idling all readers but one)."""
    return max(1, min(row_group_rows, max(MIN_ROW_GROUP_ROWS, math.ceil(rows / MIN_ROW_GROUPS))))
