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
from data_pipeline.datasets.synthetic_features import SyntheticFeatures

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationTiming:
    features: str
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
    users: int,
    items: int,
    events: int,
    seed: int,
    chunk_events: int,
    out: Path,
    features: SyntheticFeatures | None = None,
) -> GenerationTiming:
    """``features``: the extra feature groups (default: all of them)."""
    features = features if features is not None else SyntheticFeatures()
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = prepare_synthetic(
        users=users,
        items=items,
        events=events,
        seed=seed,
        out=out,
        chunk_events=chunk_events,
        features=features,
    )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    positions = int(manifest.extra["generator"]["positions"])
    sessions_per_chunk = max(1, chunk_events // positions)
    chunks = math.ceil(math.ceil(events / positions) / sessions_per_chunk)
    return GenerationTiming(
        features=",".join(g.value for g in features.groups) or "none",
        events=int(manifest.extra["counts"]["impressions"]),
        chunks=chunks,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        bytes_written=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        # ru_maxrss is KiB on Linux.
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def format_table(rows: list[GenerationTiming]) -> str:
    """One line per run; ``s per 10^6`` and the ratio to the first run of the same size (the
    run without extra feature groups when both are measured)."""
    header = (
        f"{'extra feature groups':>38} {'events':>12} {'chunks':>7} {'seconds':>9} "
        f"{'cpu s':>7} {'events/s':>12} {'s per 10^6':>10} {'ratio':>6} {'MiB out':>9} "
        f"{'peak RSS MiB':>13}"
    )
    lines = [header, "-" * len(header)]
    first: dict[int, float] = {}
    for row in rows:
        first.setdefault(row.events, row.seconds)
        lines.append(
            f"{row.features:>38} {row.events:>12,} {row.chunks:>7} {row.seconds:>9.1f} "
            f"{row.cpu_seconds:>7.1f} {row.events_per_second:>12,.0f} "
            f"{row.seconds / row.events * 1e6:>10.2f} {row.seconds / first[row.events]:>6.2f} "
            f"{row.bytes_written / 2**20:>9.1f} {row.peak_rss_mib:>13.0f}"
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
    parser.add_argument(
        "--compare-features",
        action="store_true",
        help="also generate each size without the extra feature groups, first (the baseline)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = []
    variants = [SyntheticFeatures.none(), SyntheticFeatures()]
    for events in args.events:
        for features in variants if args.compare_features else variants[1:]:
            with tempfile.TemporaryDirectory(prefix="synthetic-bench-") as tmp:
                out = args.out / f"events-{events}" if args.out else Path(tmp)
                logger.info(
                    "generating %d events (%d users, %d items)", events, args.users, args.items
                )
                rows.append(
                    time_generation(
                        args.users, args.items, events, args.seed, args.chunk_events, out, features
                    )
                )
    print(
        f"synthetic generation: {args.users:,} users, {args.items:,} items, 1 process "
        "(peak RSS: of the process so far)"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
