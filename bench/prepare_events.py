"""``twotower prepare events`` on a large log: rows/s and peak resident memory.

    python -m bench.prepare_events [--events 10000000 --users 1000000 --items 200000]

Writes a log of string ids (``user-N``, ``sku-N``, Zipf-popular items, integer seconds, click and
purchase labels) as Parquet parts of 10^6 rows under ``--work``, then runs the command in a child
process (default mapping, leave-last-out, ``--partition-events`` as given) and reads the child's
peak RSS from ``getrusage``. The log itself is generated chunk by chunk, never whole.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.table import print_table

COLUMNS = ["events", "users", "items", "partitions", "seconds", "events/s", "peak RSS GiB"]
PART_ROWS = 1_000_000


def write_log(folder: Path, events: int, users: int, items: int, seed: int = 0) -> None:
    """Parquet parts of ``PART_ROWS`` string-id events (module docstring)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, events, PART_ROWS)):
        n = min(PART_ROWS, events - start)
        user = rng.integers(0, users, n)
        item = (rng.zipf(1.2, n) - 1) % items
        table = pa.table(
            {
                "user": pa.array([f"user-{u}" for u in user.tolist()], pa.string()),
                "item": pa.array([f"sku-{i}" for i in item.tolist()], pa.string()),
                "ts": 1_700_000_000 + np.sort(rng.integers(0, 86_400 * 365, n)) + start,
                "click": (rng.random(n) < 0.8).astype(np.int8),
                "purchase": (rng.random(n) < 0.1).astype(np.int8),
            }
        )
        pq.write_table(table, folder / f"part-{part:04d}.parquet")


def run(events: int, users: int, items: int, work: Path, partition_events: int) -> list[dict]:
    log, out = work / "log", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    write_log(log, events, users, items)
    command = [
        sys.executable, "-m", "launch.cli", "prepare", "events", "--input", str(log),
        "--user-column", "user", "--item-column", "item", "--timestamp-column", "ts",
        "--label-columns", "click,purchase", "--partition-events", str(partition_events),
        "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    return [
        {
            "events": events,
            "users": manifest["extra"]["counts"]["users"],
            "items": manifest["extra"]["counts"]["items"],
            "partitions": manifest["extra"]["spill_partitions"],
            "seconds": seconds,
            "events/s": events / seconds,
            "peak RSS GiB": peak_kib / 2**20,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="prepare events: rows/s and peak RSS")
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--partition-events", type=int, default=2_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/twotower-bench-events"))
    args = parser.parse_args()
    rows = run(args.events, args.users, args.items, args.work, args.partition_events)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
