"""Reader throughput: our loader (row groups -> shuffled windows -> Batch with KJTs) against a bare
pyarrow scan of the same files and columns.

    python -m bench.reader --data data/synthetic [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.table import print_table
from data_pipeline.loader import LoaderSpec, build_event_loader
from data_pipeline.manifest import Manifest


def bare_scan(root: str, manifest: Manifest, batch_size: int) -> float:
    """rows/s of ``ParquetFile.iter_batches`` over the train split (no conversion)."""
    columns = manifest.schema.event_arrow_schema().names
    start, rows = time.perf_counter(), 0
    for path in manifest.split_paths(root, "train"):
        for record_batch in pq.ParquetFile(path).iter_batches(
            batch_size=batch_size, columns=columns
        ):
            rows += record_batch.num_rows
    return rows / (time.perf_counter() - start)


def loader_rate(root: str, manifest: Manifest, batch_size: int, workers: int) -> float:
    spec = LoaderSpec(
        root=root, split="train", batch_size=batch_size, num_workers=workers, shuffle=True, window=4
    )
    loader = build_event_loader(spec, manifest, rank=0, world_size=1)
    start, rows = time.perf_counter(), 0
    for batch in loader:
        rows += batch.size
    return rows / (time.perf_counter() - start)


def run(root: str, batch_size: int) -> list[dict]:
    manifest = Manifest.load(root)
    baseline = bare_scan(root, manifest, batch_size)
    rows = [{"method": "pyarrow iter_batches (bare scan)", "rows/s": baseline, "ratio": 1.0}]
    for workers in (0, 1, 2):  # 1: what configs/synthetic.yaml trains with, per rank
        rate = loader_rate(root, manifest, batch_size, workers)
        rows.append(
            {
                "method": f"twotower loader, {workers} workers (Batch + KJT)",
                "rows/s": rate,
                "ratio": rate / baseline,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    if not Path(args.data, "manifest.json").exists():
        raise SystemExit(f"{args.data}: prepare a dataset first (twotower prepare synthetic ...)")
    print_table(run(args.data, args.batch_size), ["method", "rows/s", "ratio"])


if __name__ == "__main__":
    main()
