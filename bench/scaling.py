"""Scaling figure: exact MIPS time vs corpus size, and training samples/s vs ranks (one PNG).

    python -m bench.scaling --data data/synthetic [--out runs/bench/scaling.png]
        [--max-corpus 10000000] [--queries 1024] [--train-steps 300] [--train-repeats 1]
        [--skip-train]

Left panel: seconds for ``--queries`` exact top-100 queries over N x 64 float32 corpora
(N = 10^5, 10^6, 10^7 up to ``--max-corpus``), ``trainer.mips.exact_topk`` and faiss
``IndexFlatIP`` side by side (``bench.mips``, ids checked against float64). A 10^7 x 64 corpus is
2.4 GiB in float32; the run holds it several times (corpus, bf16 filter copy, faiss index, the
scratch of each search): peak RSS was 10.6 GiB at 10^7, so allow about 12 GiB. Right panel: training samples/s at 1 and 2 gloo ranks for
the TorchRec two-tower and the plain-PyTorch baseline (``bench.train``). Both tables are printed.
"""

from __future__ import annotations

import argparse
import logging
import resource
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import mips, train  # noqa: E402
from bench.table import print_table  # noqa: E402

CORPUS_SIZES = (100_000, 1_000_000, 10_000_000)
MIPS_COLUMNS = ["corpus", "method", "seconds", "queries/s", "corpus GiB", "peak RSS GiB"]
_GIB = 1 << 30


def mips_scaling(max_corpus: int, queries: int, dim: int, threads: int) -> list[dict]:
    """One row per (corpus size, method) keyed by ``MIPS_COLUMNS``."""
    rows = []
    for n in (n for n in CORPUS_SIZES if n <= max_corpus):
        for row in mips.run(n=n, d=dim, queries=queries, threads=threads, repeats=1):
            rows.append(
                {
                    "corpus": n,
                    "method": row["method"],
                    "seconds": row["seconds"],
                    "queries/s": row["queries/s"],
                    "corpus GiB": n * dim * 4 / _GIB,
                    "peak RSS GiB": _peak_rss_gib(),
                }
            )
    return rows


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB  # KiB on Linux


def plot(mips_rows: list[dict], train_rows: list[dict], queries: int, out: Path) -> Path:
    figure, (mips_axis, train_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in mips_rows):
        points = [(r["corpus"], r["seconds"]) for r in mips_rows if r["method"] == method]
        mips_axis.plot(*zip(*points, strict=True), marker="o", label=method)
    mips_axis.set(
        xscale="log",
        yscale="log",
        title=f"exact top-100 MIPS, {queries} queries, d=64",
        xlabel="corpus items N",
        ylabel="seconds",
    )
    mips_axis.legend()
    for name in dict.fromkeys(r["implementation"] for r in train_rows):
        points = [(r["ranks"], r["samples/s"]) for r in train_rows if r["implementation"] == name]
        train_axis.plot(*zip(*points, strict=True), marker="o", label=name)
    ranks = sorted({r["ranks"] for r in train_rows})
    train_axis.set(
        title="training throughput (gloo, CPU)",
        xlabel="ranks",
        ylabel="samples/s",
        xticks=ranks,
        ylim=(0, None),
    )
    if train_rows:
        train_axis.legend()
    else:
        train_axis.text(0.5, 0.5, "not measured (--skip-train)", ha="center", va="center")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scaling.png"))
    parser.add_argument("--max-corpus", type=int, default=10_000_000)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-repeats", type=int, default=1, help="best of this many runs")
    parser.add_argument("--skip-train", action="store_true", help="MIPS panel only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train_rows: list[dict] = []
    if not args.skip_train:
        if not Path(args.data, "manifest.json").exists():
            raise SystemExit(f"{args.data}: prepare a dataset first (or pass --skip-train)")
        train_rows = train.run(args.config, args.data, args.train_steps, repeats=args.train_repeats)
    mips_rows = mips_scaling(args.max_corpus, args.queries, 64, args.threads)
    print(f"## Exact top-100 MIPS, {args.queries} queries, d=64")
    print_table(mips_rows, MIPS_COLUMNS)
    if train_rows:
        print("\n## Training throughput")
        print_table(train_rows, train.COLUMNS)
    print(f"\nwrote {plot(mips_rows, train_rows, args.queries, args.out)}")


if __name__ == "__main__":
    main()
