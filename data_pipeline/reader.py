"""Streaming Parquet reader: (file, row group) work units spread over rank x loader worker.

Assignment is a pure function of (epoch, seed, rank, world size, worker id, worker count), so every
row is read exactly once per epoch over all ranks and workers. Each worker concatenates a window of
its row groups, permutes the rows with an RNG keyed by (seed, epoch, rank, worker, window) and cuts
batches from the resulting continuous stream. The only state is (epoch, rows consumed): a resumed
run skips whole windows by metadata and continues mid-window, without storing rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.schema import SchemaError, validate_arrow_schema
from data_pipeline.validation import IdValidator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkUnit:
    """One Parquet row group: the reader's unit of work."""

    path: str
    row_group: int
    rows: int


def list_work_units(
    paths: Sequence[Path | str], expected: pa.Schema | None = None
) -> list[WorkUnit]:
    """Row groups of ``paths`` from Parquet metadata only, validating each file's schema.

    Files and row groups with no rows yield no units (an empty shard is allowed).

    Raises:
        SchemaError: unreadable file, or a column missing / of the wrong type (names the file).
    """
    units: list[WorkUnit] = []
    for path in paths:
        try:
            metadata = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as error:
            raise SchemaError(f"{path}: not a readable Parquet file ({error})") from error
        if expected is not None:
            validate_arrow_schema(metadata.schema.to_arrow_schema(), expected, path)
        for row_group in range(metadata.num_row_groups):
            rows = metadata.row_group(row_group).num_rows
            if rows:
                units.append(WorkUnit(str(path), row_group, rows))
    return units


def assign_work_units(
    units: Sequence[WorkUnit],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    worker_id: int,
    num_workers: int,
    shuffle: bool,
) -> list[WorkUnit]:
    """The units one (rank, worker) reads in ``epoch``; disjoint and jointly exhaustive.

    Units are permuted by (seed, epoch) when ``shuffle``, then dealt round-robin over the
    ``world_size * num_workers`` readers.
    """
    order = np.arange(len(units))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
    reader = rank * num_workers + worker_id
    readers = world_size * num_workers
    return [units[i] for i in order[reader::readers]]


def read_unit(unit: WorkUnit, columns: Sequence[str] | None) -> pa.Table:
    """Read one row group, naming file and row group if the bytes are bad.

    Pages written with CRC checksums (``ShardWriter`` writes them) are verified: a flipped byte
    inside compressed page data can otherwise decode to wrong values without any error."""
    try:
        return pq.ParquetFile(unit.path, page_checksum_verification=True).read_row_group(
            unit.row_group, columns=list(columns) if columns else None
        )
    except (OSError, pa.ArrowException) as error:
        raise SchemaError(
            f"{unit.path}: row group {unit.row_group} could not be read ({error})"
        ) from error


class ParquetEventStream(IterableDataset):
    """Yields converted batches of ``batch_size`` rows for one rank; one epoch per ``__iter__``.

    Args:
        units: every work unit of the split (all ranks).
        convert: Arrow table -> batch object (runs inside loader workers).
        validator: checks / remaps ids per row group before conversion.
        batch_size: rows per batch; each reader's last batch of the epoch may be smaller.
        columns: columns to read (None = all).
        rank, world_size: this process's place in the job.
        seed: shuffling seed; shuffle: permute units and rows.
        window: row groups per shuffle window.
        row_filter: keeps some rows of each checked row group (sequence windows); batches,
            ``rows_consumed`` and resuming then count the kept rows.
    """

    def __init__(
        self,
        units: Sequence[WorkUnit],
        convert: Callable[[pa.Table], Any],
        validator: IdValidator | None,
        batch_size: int,
        columns: Sequence[str] | None,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        window: int,
        row_filter: Callable[[pa.Table], pa.Table] | None = None,
    ) -> None:
        super().__init__()
        self.units = list(units)
        self.convert = convert
        self.validator = validator
        self.batch_size = batch_size
        self.columns = list(columns) if columns else None
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.window = window
        self.row_filter = row_filter
        self.epoch = 0
        self.rows_consumed = 0
        self._resume_rows = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_rows = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "rows_consumed": self.rows_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._resume_rows = int(state["rows_consumed"])

    def my_units(self) -> list[WorkUnit]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        return assign_work_units(
            self.units,
            epoch=self.epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            worker_id=worker_id,
            num_workers=num_workers,
            shuffle=self.shuffle,
        )

    def _windows(self, units: list[WorkUnit], skip_rows: int) -> Iterator[tuple[pa.Table, int]]:
        """Shuffled windows as (table, rows of it already consumed), skipping whole windows of
        ``skip_rows`` by metadata."""
        info = get_worker_info()
        worker_id = info.id if info else 0
        for index in range(0, len(units), self.window):
            chunk = units[index : index + self.window]
            rows = sum(u.rows for u in chunk)
            if self.row_filter is None and skip_rows >= rows:
                skip_rows -= rows
                continue
            tables = [self._read_checked(u) for u in chunk]
            table = (
                pa.concat_tables(tables, promote_options="permissive")
                if len(tables) > 1
                else tables[0]
            )
            if self.row_filter is not None:
                # Kept rows are known only after reading, so resuming skips what it has read.
                table = self.row_filter(table)
                if skip_rows >= table.num_rows:
                    skip_rows -= table.num_rows
                    continue
            if self.shuffle:
                key = [self.seed, self.epoch, self.rank, worker_id, index]
                table = table.take(np.random.default_rng(key).permutation(table.num_rows))
            yield table, skip_rows
            skip_rows = 0

    def _read_checked(self, unit: WorkUnit) -> pa.Table:
        table = read_unit(unit, self.columns)
        if self.validator is not None:
            table = self.validator(table, unit.path, unit.row_group)
        return table

    def __iter__(self) -> Iterator[Any]:
        units = self.my_units()
        self.rows_consumed = self._resume_rows
        pending: list[pa.Table] = []
        pending_rows = 0
        for table, already in self._windows(units, self._resume_rows):
            pending.append(table.slice(already))
            pending_rows += table.num_rows - already
            while pending_rows >= self.batch_size:
                merged = pa.concat_tables(pending, promote_options="permissive")
                batch, rest = merged.slice(0, self.batch_size), merged.slice(self.batch_size)
                pending, pending_rows = [rest], rest.num_rows
                self.rows_consumed += batch.num_rows
                yield self.convert(batch)
        if pending_rows:
            self.rows_consumed += pending_rows
            yield self.convert(pa.concat_tables(pending, promote_options="permissive"))
        self._resume_rows = 0


def seed_worker(worker_id: int) -> None:
    """Loader workers need no global RNG (all randomness is keyed); keep torch single-threaded
    there so 2-core machines are not oversubscribed."""
    torch.set_num_threads(1)
