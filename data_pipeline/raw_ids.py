"""The dense id -> raw id maps a converter writes beside the shards (``raw_ids/*.parquet``,
listed in ``manifest.extra["raw_ids"]``), read back for serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.manifest import Manifest
from data_pipeline.schema import ITEM_ID, USER_ID

SIDES = {"users": (USER_ID, "raw_user_id"), "items": (ITEM_ID, "raw_item_id")}


def copy_raw_ids(manifest: Manifest, source: Path | str, destination: Path | str) -> None:
    """Copy the dataset's raw-id files (if it has any) from ``source`` to ``destination``."""
    for entry in manifest.extra.get("raw_ids", {}).values():
        target = Path(destination) / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / entry["path"], target)


def read_raw_ids(manifest: Manifest, root: Path | str) -> dict[str, np.ndarray]:
    """``{"users": [U], "items": [I]}`` raw id of each dense id (whichever the dataset has).

    Raises:
        FileNotFoundError: the manifest lists a raw-id file that is missing (names it).
    """
    maps: dict[str, np.ndarray] = {}
    for side, entry in manifest.extra.get("raw_ids", {}).items():
        if side not in SIDES:
            continue
        path = Path(root) / entry["path"]
        if not path.exists():
            raise FileNotFoundError(f"{path}: raw-id map listed in the manifest is missing")
        key, raw = SIDES[side]
        table = pq.read_table(path, columns=[key, raw]).sort_by(key)
        values = table.column(raw).to_numpy(zero_copy_only=False)
        if not np.array_equal(table.column(key).to_numpy(), np.arange(len(values))):
            raise ValueError(f"{path}: {key} is not 0 .. {len(values) - 1}")
        maps[side] = values
    return maps
