"""The in-batch softmax's irreducible score work, timed alone: the bound its step is held to.

An exact softmax of B rows against C shared candidates must, forward and backward, compute the
[B, C] logits (one GEMM), read them for the row maxima, exponentiate them and sum them (three
passes), and form the two gradients from the probabilities (two GEMMs: [B, C] @ [C, D] and
[B, C]^T @ [B, D]). :func:`score_work_seconds` times exactly that on random inputs, block by
block into one reused buffer as the loss does, with the same thread count as the training run.
The bench adds it to the pointwise BCE step of the same run to bound the softmax step from
below.
"""

from __future__ import annotations

import time

import torch


def score_work_seconds(
    rows: int, candidates: int, dim: int, threads: int, block_rows: int = 1024, repeats: int = 5
) -> float:
    """Median seconds of one pass of the score work over ``rows`` x ``candidates`` at ``dim``.

    Args:
        rows: B, the rows of one rank's batch.
        candidates: C, the shared candidates (B without global negatives).
        dim: D, the embedding dimension.
        threads: intra-op threads for the timing (restored afterwards).
        block_rows: rows per block, as ``loss.block_rows``.
        repeats: timed repetitions after one warm-up.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        query = torch.randn(rows, dim, generator=generator) / dim**0.5
        keys = torch.randn(candidates, dim, generator=generator) / dim**0.5
        buffer = torch.empty(min(block_rows, rows), candidates)
        grad_query = torch.empty(rows, dim)
        grad_keys = torch.zeros(candidates, dim)

        def once() -> None:
            for start in range(0, rows, block_rows):
                stop = min(start + block_rows, rows)
                block = torch.mm(query[start:stop], keys.T, out=buffer[: stop - start])
                block.amax(dim=1)
                block.exp_().sum(dim=1)
                torch.mm(block, keys, out=grad_query[start:stop])
                grad_keys.addmm_(block.T, query[start:stop])

        once()
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            once()
            times.append(time.perf_counter() - begin)
        return sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(previous)
