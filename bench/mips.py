"""Exact top-k retrieval throughput: ``trainer.mips.exact_topk`` against faiss ``IndexFlatIP``.

    python -m bench.mips [--n 1000000 --d 64 --queries 8192 --k 100 --threads 2]

Both search the same seeded float32 corpus with the same thread count, best of ``--repeats``
interleaved runs. Ours runs with the filter precision "auto" resolves to here and, when that is
bf16, once more with the float32 filter. A subset of queries is checked against the float64 brute
force (ids in score-desc, id-asc order): ours must match it exactly; faiss's agreement is
reported. The machine should be otherwise idle: with 2 cores, another busy process changes both
numbers (faiss's more than ours).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch

from bench.table import print_table
from trainer.mips import bruteforce_topk, exact_topk, resolved_filter_precision

logger = logging.getLogger(__name__)

COLUMNS = ["method", "queries/s", "ratio", "seconds", "exact ids"]
_REFERENCE_BATCH = 8  # bounds the reference's [batch, N] float64 scores and sort


def run(
    n: int = 1_000_000,
    d: int = 64,
    queries: int = 8192,
    k: int = 100,
    threads: int = 2,
    verify: int = 32,
    seed: int = 0,
    repeats: int = 3,
) -> list[dict]:
    """Time each search ``repeats`` times, interleaved, and keep each one's best run.

    Rows are keyed by ``COLUMNS`` ("ratio" is vs faiss). "exact ids" is the fraction of the
    ``verify`` checked queries whose k ids equal the float64 reference exactly. Raises
    RuntimeError if ours does not match the reference.
    """
    import faiss  # optional benchmark dependency

    generator = torch.Generator().manual_seed(seed)
    corpus = torch.randn(n, d, generator=generator)
    query_batch = torch.randn(queries, d, generator=generator)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(d)
    index.add(corpus.numpy())

    # "auto" is what callers get; the float32 filter row shows what the bf16 filter adds.
    auto = resolved_filter_precision(corpus)
    searches: dict[str, Callable[[], torch.Tensor]] = {
        "faiss IndexFlatIP": lambda: torch.from_numpy(index.search(query_batch.numpy(), k)[1]),
        f"exact_topk, {auto} filter": lambda: exact_topk(query_batch, corpus, k)[1],
    }
    if auto != "float32":
        searches["exact_topk, float32 filter"] = lambda: exact_topk(
            query_batch, corpus, k, filter_precision="float32"
        )[1]
    index.search(query_batch[:16].numpy(), k)  # warm up thread pools and the bf16 timing
    exact_topk(query_batch[:16], corpus[:65536], k)
    best = dict.fromkeys(searches, float("inf"))
    found: dict[str, torch.Tensor] = {}
    for repeat in range(repeats):
        for name, search in searches.items():
            start = time.perf_counter()
            found[name] = search()
            best[name] = min(best[name], time.perf_counter() - start)
            logger.info("%s, run %d: %.1f s", name, repeat + 1, time.perf_counter() - start)

    reference = _reference_ids(query_batch[:verify], corpus, k)
    faiss_seconds = best["faiss IndexFlatIP"]
    rows = []
    for name, seconds in best.items():
        exact = _fraction_identical(found[name][:verify], reference)
        if name.startswith("exact_topk") and exact != 1.0:
            raise RuntimeError(f"{name} differs from the float64 reference ({exact:.3f})")
        rows.append(_row(name, queries, seconds, faiss_seconds, exact))
    return rows


def _reference_ids(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> torch.Tensor:
    """[V, k] float64 brute-force ids, a few queries at a time."""
    parts = [
        bruteforce_topk(queries[i : i + _REFERENCE_BATCH], corpus, k)[1]
        for i in range(0, queries.shape[0], _REFERENCE_BATCH)
    ]
    return torch.cat(parts)


def _fraction_identical(ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of rows of ids [V, k] equal to reference [V, k] in every position."""
    return float((ids.long() == reference).all(dim=1).double().mean())


def _row(method: str, queries: int, seconds: float, faiss_seconds: float, exact: float) -> dict:
    return {
        "method": method,
        "queries/s": queries / seconds,
        "ratio": faiss_seconds / seconds,
        "seconds": seconds,
        "exact ids": exact,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus items")
    parser.add_argument("--d", type=int, default=64, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=8192)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verify", type=int, default=32, help="queries checked vs float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    rows = run(
        args.n, args.d, args.queries, args.k, args.threads, args.verify, args.seed, args.repeats
    )
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
