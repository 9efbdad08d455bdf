"""Streaming reads of a user's interaction log: Parquet, CSV, TSV, JSONL, or the one-user-per-line
sequence text of the SASRec / BERT4Rec benchmark files (``user item item ...``, in time order).

:func:`event_chunks` yields bounded :class:`EventChunk` s (never the whole log) with raw ids as
strings, timestamps as int64 seconds and labels as float32, and checks every row on the way:
a missing column, a null or empty id, an unparseable row, a non-numeric or null label and an
unreadable timestamp raise :class:`~data_pipeline.schema.SchemaError` naming the file, the column
and the row (0-based data row of the file; for Parquet also its row group).
"""

from __future__ import annotations

import csv
import enum
import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data_pipeline.datasets.events_mapping import EventMapping
from data_pipeline.schema import SchemaError

CHUNK_ROWS = 1 << 18
_BLOCK_BYTES = 1 << 24


class InputFormat(enum.Enum):
    PARQUET = "parquet"
    CSV = "csv"
    TSV = "tsv"
    JSONL = "jsonl"
    SEQUENCE = "sequence"


SUFFIXES = {
    ".parquet": InputFormat.PARQUET,
    ".pq": InputFormat.PARQUET,
    ".csv": InputFormat.CSV,
    ".tsv": InputFormat.TSV,
    ".tab": InputFormat.TSV,
    ".jsonl": InputFormat.JSONL,
    ".ndjson": InputFormat.JSONL,
    ".json": InputFormat.JSONL,
    ".txt": InputFormat.SEQUENCE,
}
# Column names of the sequence format's rows.
SEQUENCE_USER, SEQUENCE_ITEM, SEQUENCE_POSITION = "user", "item", "position"


def input_files(spec: str | Path) -> list[Path]:
    """A file, a folder (every supported file inside, sorted) or a glob, as a sorted list.

    Raises:
        FileNotFoundError: nothing matches ``spec``.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"{spec}: no input files (supported: {sorted(SUFFIXES)})")
    return files


def file_format(path: Path, forced: InputFormat | None = None) -> InputFormat:
    """``forced``, else the format of ``path``'s suffix."""
    if forced is not None:
        return forced
    try:
        return SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise SchemaError(
            f"{path}: unknown file type {path.suffix!r}; use one of {sorted(SUFFIXES)} or --format"
        ) from None


@dataclass(frozen=True)
class TableChunk:
    """Rows ``first_row .. first_row + table.num_rows - 1`` of ``file`` (``row_group``: Parquet)."""

    file: Path
    first_row: int
    table: pa.Table
    row_group: int | None = None

    def where(self, index: int) -> str:
        """``file, row N`` (and the row group) of the chunk's ``index``-th row."""
        group = f", row group {self.row_group}" if self.row_group is not None else ""
        return f"{self.file}{group}, row {self.first_row + index}"


def table_chunks(
    path: Path,
    columns: tuple[str, ...],
    input_format: InputFormat,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[TableChunk]:
    """The ``columns`` of ``path`` in chunks of at most ``chunk_rows`` rows (text formats read
    every column as a string; the caller parses them)."""
    if input_format is InputFormat.SEQUENCE:
        yield from _sequence_chunks(path, chunk_rows)
        return
    if input_format is InputFormat.PARQUET:
        yield from _parquet_chunks(path, columns, chunk_rows)
        return
    if input_format is InputFormat.JSONL:
        yield from _json_chunks(path, columns)
        return
    yield from _csv_chunks(path, columns, "\t" if input_format is InputFormat.TSV else ",")


def _missing(path: Path, columns: tuple[str, ...], have: list[str]) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise SchemaError(f"{path}: missing column(s) {missing} (the file has {have})")


def _parquet_chunks(path: Path, columns: tuple[str, ...], chunk_rows: int) -> Iterator[TableChunk]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise SchemaError(f"{path}: not a readable Parquet file ({error})") from error
    _missing(path, columns, parquet.schema_arrow.names)
    first = 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=list(columns))
        for start in range(0, table.num_rows, chunk_rows):
            chunk = table.slice(start, chunk_rows)
            yield TableChunk(path, first + start, chunk, group)
        first += table.num_rows


def _csv_chunks(path: Path, columns: tuple[str, ...], delimiter: str) -> Iterator[TableChunk]:
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    _missing(path, columns, header)
    try:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=_BLOCK_BYTES),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter),
            convert_options=pa_csv.ConvertOptions(
                include_columns=list(columns),
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as error:
        raise SchemaError(f"{path}: unparseable row in the first block: {error}") from error
    yield from _stream_chunks(path, reader, columns)


def _json_chunks(path: Path, columns: tuple[str, ...]) -> Iterator[TableChunk]:
    try:
        reader = pa_json.open_json(path, read_options=pa_json.ReadOptions(block_size=_BLOCK_BYTES))
    except pa.ArrowInvalid as error:
        raise SchemaError(f"{path}: unparseable JSON lines ({error})") from error
    yield from _stream_chunks(path, reader, columns)


def _stream_chunks(path: Path, reader: Any, columns: tuple[str, ...]) -> Iterator[TableChunk]:
    """The reader's batches as chunks of ``columns``; a parse error names the file and the last
    good row."""
    first = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as error:
            raise SchemaError(
                f"{path}: unparseable row after data row {first - 1}: {error}"
            ) from error
        _missing(path, columns, batch.schema.names)
        yield TableChunk(path, first, pa.Table.from_batches([batch]).select(list(columns)))
        first += batch.num_rows


def _sequence_chunks(path: Path, chunk_rows: int) -> Iterator[TableChunk]:
    """``user item item ...`` per line -> rows (user, item, position in the line)."""
    users: list[str] = []
    items: list[str] = []
    positions: list[int] = []
    first = 0
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise SchemaError(
                    f"{path}, line {line_number + 1}: expected 'user item [item ...]', got "
                    f"{line.strip()!r}"
                )
            users += [tokens[0]] * (len(tokens) - 1)
            items += tokens[1:]
            positions += range(len(tokens) - 1)
            if len(users) >= chunk_rows:
                yield _sequence_table(path, first, users, items, positions)
                first += len(users)
                users, items, positions = [], [], []
    if users:
        yield _sequence_table(path, first, users, items, positions)


def _sequence_table(
    path: Path, first: int, users: list[str], items: list[str], positions: list[int]
) -> TableChunk:
    table = pa.table(
        {
            SEQUENCE_USER: pa.array(users, pa.string()),
            SEQUENCE_ITEM: pa.array(items, pa.string()),
            SEQUENCE_POSITION: pa.array(positions, pa.int64()),
        }
    )
    return TableChunk(path, first, table)


@dataclass(frozen=True)
class EventChunk:
    """Checked events of one chunk.

    Args:
        user, item: [R] string raw ids (no nulls, none empty).
        timestamp: [R] int64 seconds, or None (the caller uses the order of appearance).
        labels: label name -> [R] float32.
        source: where the rows came from (for later errors).
    """

    user: pa.Array
    item: pa.Array
    timestamp: np.ndarray | None
    labels: dict[str, np.ndarray]
    source: TableChunk

    @property
    def rows(self) -> int:
        return len(self.user)


def event_chunks(
    files: list[Path],
    mapping: EventMapping,
    forced_format: InputFormat | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[EventChunk]:
    """Every event of ``files`` in order, checked (module docstring)."""
    for path in files:
        input_format = file_format(path, forced_format)
        if input_format is InputFormat.SEQUENCE:
            columns: tuple[str, ...] = (SEQUENCE_USER, SEQUENCE_ITEM, SEQUENCE_POSITION)
        else:
            columns = mapping.log_columns()
        for chunk in table_chunks(path, columns, input_format, chunk_rows):
            yield _checked(chunk, mapping, input_format)


def _checked(chunk: TableChunk, mapping: EventMapping, input_format: InputFormat) -> EventChunk:
    if input_format is InputFormat.SEQUENCE:
        table = chunk.table
        return EventChunk(
            user=table.column(SEQUENCE_USER).combine_chunks(),
            item=table.column(SEQUENCE_ITEM).combine_chunks(),
            timestamp=table.column(SEQUENCE_POSITION).to_numpy(),
            labels={name: np.ones(table.num_rows, np.float32) for name in mapping.label_names()},
            source=chunk,
        )
    labels = {name: _label(chunk, name) for name in mapping.labels}
    if not mapping.labels:
        labels = {name: np.ones(chunk.table.num_rows, np.float32) for name in mapping.label_names()}
    return EventChunk(
        user=_ids(chunk, mapping.user),
        item=_ids(chunk, mapping.item),
        timestamp=_timestamps(chunk, mapping.timestamp) if mapping.timestamp else None,
        labels=labels,
        source=chunk,
    )


def _column(chunk: TableChunk, name: str) -> pa.Array:
    column = chunk.table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _first(mask: pa.Array) -> int:
    return int(pc.indices_nonzero(mask)[0].as_py())


def _ids(chunk: TableChunk, name: str) -> pa.Array:
    column = _column(chunk, name)
    if pa.types.is_floating(column.type):
        whole = pc.equal(column, pc.floor(column))
        if not pc.all(pc.fill_null(whole, True)).as_py():
            bad = _first(pc.invert(pc.fill_null(whole, True)))
            raise SchemaError(
                f"{chunk.where(bad)}: column {name!r}: id {column[bad]} is fractional"
            )
        column = pc.cast(column, pa.int64())
    try:
        strings = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise SchemaError(
            f"{chunk.file}: column {name!r} of type {column.type} is not an id"
        ) from error
    missing = pc.fill_null(pc.equal(pc.utf8_length(strings), 0), True)
    if pc.any(missing).as_py():
        bad = _first(missing)
        raise SchemaError(f"{chunk.where(bad)}: column {name!r}: missing (null or empty) id")
    return strings


def _label(chunk: TableChunk, name: str) -> np.ndarray:
    column = _column(chunk, name)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    if column.null_count:
        raise SchemaError(f"{chunk.where(_first(pc.is_null(column)))}: column {name!r}: null label")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column = pc.cast(pc.utf8_trim_whitespace(column), pa.float64())
        except pa.ArrowInvalid:
            bad = next(i for i, v in enumerate(column.to_pylist()) if not _is_number(v))
            raise SchemaError(
                f"{chunk.where(bad)}: column {name!r}: label {column[bad].as_py()!r} is not a number"
            ) from None
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise SchemaError(f"{chunk.file}: column {name!r} of type {column.type} is not a label")
    values = column.to_numpy(zero_copy_only=False).astype(np.float32)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise SchemaError(f"{chunk.where(bad)}: column {name!r}: label {values[bad]} is not finite")
    return values


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _timestamps(chunk: TableChunk, name: str) -> np.ndarray:
    """[R] int64 seconds from integer / floating seconds, a timestamp type or ISO-8601 text."""
    column = _column(chunk, name)
    if column.null_count:
        raise SchemaError(
            f"{chunk.where(_first(pc.is_null(column)))}: column {name!r}: null timestamp"
        )
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = _parse_time_text(chunk, name, pc.utf8_trim_whitespace(column))
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        column = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    if pa.types.is_floating(column.type):
        column = pc.cast(pc.floor(column), pa.int64())
    if not pa.types.is_integer(column.type):
        raise SchemaError(f"{chunk.file}: column {name!r} of type {column.type} is not a time")
    return column.to_numpy(zero_copy_only=False).astype(np.int64)


def _parse_time_text(chunk: TableChunk, name: str, column: pa.Array) -> pa.Array:
    """Text times: all integers (seconds), else ISO-8601 (``2024-01-31 12:00:00[.123][Z]``),
    truncated to seconds."""
    try:
        return pc.cast(column, pa.int64())
    except pa.ArrowInvalid:
        pass
    parsed = _iso_seconds(column)
    if parsed is not None:
        return parsed
    for index, value in enumerate(column.to_pylist()):
        if not value.lstrip("-").isdigit() and _iso_seconds(pa.array([value])) is None:
            raise SchemaError(
                f"{chunk.where(index)}: column {name!r}: {value!r} is neither integer "
                "seconds nor an ISO-8601 time"
            )
    raise SchemaError(f"{chunk.file}: column {name!r} mixes integer seconds and ISO-8601 times")


def _iso_seconds(column: pa.Array) -> pa.Array | None:
    """ISO-8601 text as timestamp[s] (naive or with a UTC offset), or None if any fails."""
    for kind in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):
        try:
            parsed = pc.cast(column, kind)
        except pa.ArrowInvalid:
            continue
        return pc.cast(parsed, pa.timestamp("s", tz=kind.tz), safe=False)
    return None
