"""Streaming Parquet writer: rows go out in row groups as they are produced, files roll over
at a row budget, and every finished file is checksummed for the manifest.

Memory is bounded by one row group, whatever the total number of rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.manifest import ShardFile, SplitInfo, sha256_file
from data_pipeline.schema import validate_arrow_schema


class ShardWriter:
    """Write one split as ``<root>/<split>/part-NNNNN.parquet``.

    Args:
        root: dataset directory.
        split: split name (``train``, ``items`` ...).
        schema: Arrow schema every table written must match.
        rows_per_file: start a new file after this many rows.
        row_group_rows: rows per Parquet row group (the reader's unit of work).
    """

    def __init__(
        self,
        root: Path | str,
        split: str,
        schema: pa.Schema,
        rows_per_file: int = 1_000_000,
        row_group_rows: int = 65_536,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.info = SplitInfo()
        self._writer: pq.ParquetWriter | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._rows_in_file = 0
        self._row_groups_in_file = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows; columns are cast to the split schema (names and order must match)."""
        validate_arrow_schema(table.schema, self.schema, f"<rows for {self.split}>")
        table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush_row_group(self.row_group_rows)

    def _flush_row_group(self, rows: int) -> None:
        merged = pa.concat_tables(self._pending)
        head, tail = merged.slice(0, rows), merged.slice(rows)
        self._pending = [tail] if tail.num_rows else []
        self._pending_rows = tail.num_rows
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write_table(head, row_group_size=rows)
        self._rows_in_file += head.num_rows
        self._row_groups_in_file += 1
        if self._rows_in_file >= self.rows_per_file:
            self._close_file()

    def _open(self) -> None:
        index = len(self.info.files)
        self._final_path = self.root / self.split / f"part-{index:05d}.parquet"
        self._tmp_path = self._final_path.with_suffix(".parquet.tmp")
        self._writer = pq.ParquetWriter(
            self._tmp_path, self.schema, compression="zstd", write_page_checksum=True
        )
        self._rows_in_file = 0
        self._row_groups_in_file = 0

    def _close_file(self) -> None:
        assert self._writer is not None and self._tmp_path and self._final_path
        self._writer.close()
        os.replace(self._tmp_path, self._final_path)
        self.info.files.append(
            ShardFile(
                path=str(self._final_path.relative_to(self.root)),
                rows=self._rows_in_file,
                row_groups=self._row_groups_in_file,
                sha256=sha256_file(self._final_path),
            )
        )
        self._writer = None

    def close(self) -> SplitInfo:
        """Flush the remaining rows, close the last file and return the split's file list."""
        if self._pending_rows:
            self._flush_row_group(self._pending_rows)
        if self._writer is not None:
            self._close_file()
        if not self.info.files:
            # An empty split still gets one (empty) file so the schema is on disk.
            self._open()
            self._close_file()
        return self.info

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()
