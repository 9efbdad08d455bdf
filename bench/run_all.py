"""All foundation benchmarks in one run, printed as side-by-side tables (`make bench`).

    python -m bench.run_all [--events 2000000] [--mips-n 1000000] [--train-steps 300]
        [--figure runs/bench/scaling.png --figure-max-corpus 10000000]

1. training samples/s at 1 and 2 gloo ranks (synthetic world): the TorchRec two-tower against
   the plain-PyTorch baseline (``bench.train``);
2. reader rows/s against a bare pyarrow scan of the same files, and against the trainer;
3. exact top-100 MIPS queries/s against faiss IndexFlatIP on a 10^6 x 64 corpus;
4. the scaling figure (``bench.scaling``): MIPS time vs corpus size, samples/s vs ranks.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bench import mips, reader, scaling, train
from bench.table import print_table
from data_pipeline.datasets.synthetic import prepare_synthetic


def ensure_synthetic(path: Path, events: int) -> Path:
    if not (path / "manifest.json").exists():
        prepare_synthetic(users=50_000, items=20_000, events=events, seed=0, out=path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("data/bench-synthetic"))
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--mips-n", type=int, default=1_000_000)
    parser.add_argument("--mips-queries", type=int, default=8192)
    parser.add_argument("--figure", type=Path, default=Path("runs/bench/scaling.png"))
    parser.add_argument("--figure-max-corpus", type=int, default=10_000_000)
    parser.add_argument("--figure-queries", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = str(ensure_synthetic(args.data, args.events))

    train_rows = train.run("configs/synthetic.yaml", data, args.train_steps)
    print("\n## Training throughput (synthetic world, configs/synthetic.yaml)")
    print_table(train_rows, train.COLUMNS)

    reader_rows = reader.run(data, batch_size=1024)
    print("\n## Reader throughput (train split)")
    print_table(reader_rows, ["method", "rows/s", "ratio"])
    fastest_trainer = max(r["samples/s"] for r in train_rows)
    fastest_reader = max(r["rows/s"] for r in reader_rows[1:])
    print(
        f"reader rows/s / fastest trainer samples/s = {fastest_reader / fastest_trainer:.1f}x "
        "(the data path must stay >= 5x)"
    )

    print(f"\n## Exact top-100 MIPS, {args.mips_n:,} x 64 corpus, {args.mips_queries} queries")
    print_table(mips.run(n=args.mips_n, queries=args.mips_queries), mips.COLUMNS)

    mips_rows = scaling.mips_scaling(args.figure_max_corpus, args.figure_queries, 64, 2)
    print(f"\n## Exact top-100 MIPS vs corpus size, {args.figure_queries} queries")
    print_table(mips_rows, scaling.MIPS_COLUMNS)
    print(f"wrote {scaling.plot(mips_rows, train_rows, args.figure_queries, args.figure)}")


if __name__ == "__main__":
    main()
