"""Time synthetic-world generation (events/s), Parquet writing included.

    .venv/bin/python -m bench.synthetic_gen --events 10000000

Prints one table row per run: events, chunks, wall and CPU seconds (CPU time is the fairer
number on a shared machine), events/s (wall), bytes written, peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.datasets.synthetic import DEFAULT_CHUNK_EVENTS, prepare_synthetic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationTiming:
    events: int
    chunks: int
    seconds: float
    cpu_seconds: float
    bytes_written: int
    peak_rss_mib: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds


def time_generation(
    users: int, items: int, events: int, seed: int, chunk_events: int, out: Path
) -> GenerationTiming:
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = prepare_synthetic(
        users=users, items=items, events=events, seed=seed, out=out, chunk_events=chunk_events
    )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    positions = int(manifest.extra["generator"]["positions"])
    sessions_per_chunk = max(1, chunk_events // positions)
    chunks = math.ceil(math.ceil(events / positions) / sessions_per_chunk)
    return GenerationTiming(
        events=int(manifest.extra["counts"]["impressions"]),
        chunks=chunks,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        bytes_written=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        # ru_maxrss is KiB on Linux.
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def format_table(rows: list[GenerationTiming]) -> str:
    header = (
        f"{'events':>12} {'chunks':>7} {'seconds':>9} {'cpu s':>7} {'events/s':>12} {'MiB out':>9} "
        f"{'peak RSS MiB':>13}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.events:>12,} {row.chunks:>7} {row.seconds:>9.1f} {row.cpu_seconds:>7.1f} "
            f"{row.events_per_second:>12,.0f} {row.bytes_written / 2**20:>9.1f} "
            f"{row.peak_rss_mib:>13.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--events", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-events", type=int, default=DEFAULT_CHUNK_EVENTS)
    parser.add_argument("--out", type=Path, default=None, help="keep the output here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = []
    for events in args.events:
        with tempfile.TemporaryDirectory(prefix="synthetic-bench-") as tmp:
            out = args.out / f"events-{events}" if args.out else Path(tmp)
            logger.info("generating %d events (%d users, %d items)", events, args.users, args.items)
            rows.append(
                time_generation(args.users, args.items, events, args.seed, args.chunk_events, out)
            )
    print(f"synthetic generation: {args.users:,} users, {args.items:,} items, 1 process")
    print(format_table(rows))


if __name__ == "__main__":
    main()
