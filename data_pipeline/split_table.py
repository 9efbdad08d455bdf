"""Whole-split reads of a few columns: the item corpus, user/item id pairs of a split (not the
event stream, which :mod:`data_pipeline.reader` streams row group by row group)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.manifest import Manifest
from data_pipeline.schema import SchemaError


def read_split_columns(
    root: str, manifest: Manifest, split: str, columns: Sequence[str]
) -> pa.Table:
    """Whole-split read of a few columns (corpus and user/item id pairs, not event features).

    Raises:
        SchemaError: a file is unreadable or corrupt (names the file).
    """
    tables = []
    for path in manifest.split_paths(root, split):
        try:
            tables.append(
                pq.read_table(path, columns=list(columns), page_checksum_verification=True)
            )
        except (OSError, pa.ArrowException) as error:
            raise SchemaError(
                f"{path}: could not read columns {list(columns)} ({error})"
            ) from error
    return pa.concat_tables(tables)
