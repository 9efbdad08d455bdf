"""What the global passes of ``prepare events`` leave for the per-partition and merge stages.

The global stage (id maps, spill, de-duplication, k-core, time counts, thresholds, counters)
writes it into the staging folder; a partition job or the merge, possibly on another machine of
a SLURM job array, reads it back. ``state.json`` holds the scalars and a fingerprint of the
input files and flags: a stage run with other flags or input than the global stage refuses to
go on. Arrays go to ``state.npz``, the id maps to ``raw_ids/`` (the dataset's own files).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.datasets.events_counters import EventCounters, counts_spill
from data_pipeline.datasets.events_mapping import EventMapping
from data_pipeline.datasets.events_spill import (
    ITEM,
    USER,
    IdMap,
    PartitionSpill,
    TimeCounts,
    deduplicated,
)
from data_pipeline.datasets.output import write_side_file
from data_pipeline.datasets.split import TemporalThresholds
from data_pipeline.schema import ITEM_ID, USER_ID

STATE_FILE, ARRAYS_FILE = "state.json", "state.npz"
SPILL = "_spill"


@dataclass
class SpilledLog:
    """The spilled log and its id maps after de-duplication and the k-core.

    Args:
        spill: the events by user.
        mapping: the column mapping.
        users, items: raw id of every surviving dense id.
        user_new, item_new: [U0], [I0] first-pass dense id -> surviving id (-1: dropped).
        input_events: events read.
        k_core_iterations: iterations to the fixed point.
    """

    spill: PartitionSpill
    mapping: EventMapping
    users: IdMap
    items: IdMap
    user_new: np.ndarray
    item_new: np.ndarray
    input_events: int
    k_core_iterations: int

    def partition(self, p: int) -> dict[str, np.ndarray]:
        """Partition ``p``'s surviving events in surviving dense ids, log order."""
        events = deduplicated(self.spill.read(p), self.mapping.dedup)
        user, item = self.user_new[events[USER]], self.item_new[events[ITEM]]
        live = (user >= 0) & (item >= 0)
        kept = {name: values[live] for name, values in events.items()}
        kept[USER], kept[ITEM] = user[live], item[live]
        return kept

    def partitions(self) -> Any:
        for p in range(self.spill.partitions):
            yield self.partition(p)


@dataclass
class GlobalState:
    """Everything the later stages need (module docstring).

    Args:
        log: the spilled log.
        counts: events per second (thresholds, split sizes).
        user_events: [U] events per surviving user.
        thresholds: the temporal split's, or None (leave-last-out).
        counters: the item counters, or None.
        real_time: the log has event times (time context and counters apply).
        source: the manifest's ``source`` (files with sha256, mapping).
        fingerprint: input files (path, size) and flags; later stages must match it.
        raw_ids: ``{"users"|"items": {path, sha256}}`` of the id maps, set by :func:`save_state`.
    """

    log: SpilledLog
    counts: TimeCounts
    user_events: np.ndarray
    thresholds: TemporalThresholds | None
    counters: EventCounters | None
    real_time: bool
    source: dict[str, Any]
    fingerprint: dict[str, Any]
    raw_ids: dict[str, dict[str, str]] = field(default_factory=dict)


def save_state(staging: Path, state: GlobalState) -> None:
    log, counters = state.log, state.counters
    raw_ids = {
        "users": write_side_file(
            staging, "raw_ids/users.parquet", _raw_table(USER_ID, "raw_user_id", log.users)
        ),
        "items": write_side_file(
            staging, "raw_ids/items.parquet", _raw_table(ITEM_ID, "raw_item_id", log.items)
        ),
    }
    state.raw_ids = raw_ids
    arrays = {
        "user_new": log.user_new,
        "item_new": log.item_new,
        "time_values": state.counts.values,
        "time_counts": state.counts.counts,
        "user_events": state.user_events,
    }
    scalars: dict[str, Any] = {
        "partitions": log.spill.partitions,
        "raw_ids": raw_ids,
        "input_events": log.input_events,
        "k_core_iterations": log.k_core_iterations,
        "thresholds": asdict(state.thresholds) if state.thresholds is not None else None,
        "real_time": state.real_time,
        "source": state.source,
        "fingerprint": state.fingerprint,
        "counters": None,
    }
    if counters is not None:
        arrays.update({f"snapshot/{name}": values for name, values in counters.snapshot.items()})
        scalars["counters"] = {
            "names": list(counters.names),
            "snapshot_time": counters.snapshot_time,
            "statistics": counters.statistics,
            "snapshot_rule": counters.snapshot_rule,
        }
    np.savez(staging / ARRAYS_FILE, allow_pickle=False, **arrays)
    (staging / STATE_FILE).write_text(json.dumps(scalars, indent=1))


def load_state(staging: Path, mapping: EventMapping, fingerprint: dict[str, Any]) -> GlobalState:
    """The global stage's state in ``staging``.

    Raises:
        FileNotFoundError: no global stage ran there.
        ValueError: it ran with other input files or flags (names what differs).
    """
    path = staging / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no global stage here; run --stage global first")
    scalars = json.loads(path.read_text())
    differ = sorted(k for k in fingerprint if scalars["fingerprint"].get(k) != fingerprint[k])
    if differ:
        raise ValueError(
            f"{path}: the global stage ran with other {differ}; rerun --stage global with these "
            "flags or run this stage with the global stage's"
        )
    arrays = np.load(staging / ARRAYS_FILE)
    spill = PartitionSpill.of_events(
        staging / SPILL / "events", scalars["partitions"], mapping.label_names()
    )
    log = SpilledLog(
        spill,
        mapping,
        _raw_map(staging / "raw_ids" / "users.parquet", "raw_user_id"),
        _raw_map(staging / "raw_ids" / "items.parquet", "raw_item_id"),
        arrays["user_new"],
        arrays["item_new"],
        scalars["input_events"],
        scalars["k_core_iterations"],
    )
    counters = None
    if scalars["counters"] is not None:
        saved = scalars["counters"]
        names = tuple(saved["names"])
        counters = EventCounters(
            names,
            counts_spill(staging / SPILL, scalars["partitions"], names),
            {name: arrays[f"snapshot/{name}"] for name in names},
            saved["snapshot_time"],
            saved["statistics"],
            saved["snapshot_rule"],
        )
    thresholds = scalars["thresholds"]
    return GlobalState(
        log=log,
        counts=TimeCounts.of(arrays["time_values"], arrays["time_counts"]),
        user_events=arrays["user_events"],
        thresholds=TemporalThresholds(**thresholds) if thresholds is not None else None,
        counters=counters,
        real_time=scalars["real_time"],
        source=scalars["source"],
        fingerprint=scalars["fingerprint"],
        raw_ids=scalars["raw_ids"],
    )


def _raw_table(key: str, raw: str, ids: IdMap) -> pa.Table:
    return pa.table({key: np.arange(len(ids), dtype=np.int64), raw: ids.raw})


def _raw_map(path: Path, column: str) -> IdMap:
    return IdMap(pq.read_table(path, columns=[column]).column(column).combine_chunks())
