"""The blocked sweep behind ``trainer.mips.exact_topk``: exact top-K by inner product without
ever allocating the [Q, N] score matrix. Internal to ``trainer.mips``; use the API there.

What it does (and why it is fast): the GEMM is cheap; choosing the top-K out of the [Q, N]
scores is what costs. Each query chunk sweeps the corpus chunk by chunk with one GEMM each and
keeps, per query, a small buffer of candidates plus a threshold; an item only enters the buffer
when its score reaches the threshold. The threshold is seeded from a few chunks scored up front
and, every K/4 appended entries per query, tightened to just below the buffer's K-th best score
by counting entries in 64 buckets (no top-k), so only ~K * (1 + log(N / seeded items)) items
per query ever enter, and the per-chunk work is the GEMM, a max over groups of ``_GROUP``
columns and a compare on the 64x smaller group maxima. Where the CPU has native bf16 dot
products (``filter_precision``), the GEMMs are bf16 (~2x cheaper) and their hits are re-scored
in float32 before entering the buffer. On CPU, query chunks are spread over worker threads that
each run torch single-threaded: no fork-join per op, and a core taken by another process slows
one stream instead of stalling every parallel op (2 busy cores: ~440 vs ~60 queries/s).

Why filtering stays exact (the margin): a float32 GEMM score s32 and the float64 score s64 of a
pair differ by at most e_q = gamma_D |q| max_n |c_n| (the dot-product rounding bound, any
summation order; ``trainer.mips.score_error_bound``), doubled for safety. If T is the K-th
largest float32 score among the items seen, at least K items have s64 >= T - e_q, so every item
of the true top-K has s64 >= T - e_q, hence s32 >= T - 2 e_q: the buffer keeps every such item,
a superset of the true top-K. The bf16 GEMM's fp32 accumulator is within E_q of the exact score
(input rounding and accumulation; ``trainer.mips.precision.bfloat16_filter_bound``), and its
rounding to bf16 is monotone, so it passes every pair whose bf16 score reaches threshold - e_q -
E_q rounded down to bf16. The final step rescores the buffer in float64 and sorts by (score
desc, id asc), so the answer, ties broken by lower id, equals a float64 brute force. If float32
ties would grow a row past 2K entries (e.g. integer embeddings), the row is pruned exactly
(float64, keep K; threshold s64_K - e_q), so memory stays bounded by the chunk sizes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from trainer.mips.candidates import FLOAT32_MIN, CandidateBuffer, ExcludedPairs, counts_of_sorted
from trainer.mips.precision import (
    FilterPrecision,
    bfloat16_corpus,
    bfloat16_filter_bound,
    bound_from_norms,
    input_norms,
    resolve_filter_precision,
)

# Columns reduced to one maximum before thresholding; 64 keeps the pre-filter ~0.1 ns per score.
_GROUP = 64
# Corpus chunks scored up front to seed the threshold: at most 4 (6 with the bf16 filter: its
# GEMM costs half), and 1 per 16 chunks.
_SEED_CHUNKS = 4
_SEED_CHUNKS_BFLOAT16 = 6
_SEED_FRACTION = 16


def sweep_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    corpus_ids: torch.Tensor,
    k: int,
    excluded: ExcludedPairs | None,
    query_chunk: int,
    corpus_chunk: int,
    num_threads: int | None,
    filter_precision: FilterPrecision,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of every query with float64 scores; inputs already checked, none empty.

    Args:
        queries: [Q, D] float32, Q > 0.
        corpus: [N, D] float32, N > 0.
        corpus_ids: [N] int64 unique item ids, on the queries' device.
        k: results per query.
        excluded: (query, corpus row) pairs never returned, or None.
        query_chunk, corpus_chunk, num_threads, filter_precision: as in ``exact_topk``.
    Returns:
        scores: [Q, k] float64 (-inf padding), ids: [Q, k] int64 (-1 padding).
    """
    num_queries, num_items, device = queries.shape[0], corpus.shape[0], queries.device
    scores_out = torch.full((num_queries, k), float("-inf"), dtype=torch.float64, device=device)
    ids_out = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    workers = (num_threads or torch.get_num_threads()) if device.type == "cpu" else 1
    stream_threads = 1 if workers > 1 else num_threads
    sweep = _prepare_sweep(
        queries, corpus, corpus_chunk, num_threads, stream_threads, filter_precision
    )
    with _intra_op_threads(stream_threads):
        chunk = min(query_chunk, -(-num_queries // workers))
        per_thread = threading.local()

        def solve(start: int) -> None:
            stop = min(start + chunk, num_queries)
            if not hasattr(per_thread, "scratch"):
                per_thread.scratch = _Scratch.allocate(
                    chunk, min(corpus_chunk, num_items), sweep.corpus_bfloat16 is not None, device
                )
            buffer = CandidateBuffer(
                queries[start:stop], corpus, corpus_ids, k, sweep.error[start:stop]
            )
            chunk_excluded = None if excluded is None else excluded.for_queries(start, stop)
            sweep.run(buffer, start, chunk_excluded, per_thread.scratch)
            scores_out[start:stop], ids_out[start:stop] = buffer.finish()

        if workers == 1:
            for start in range(0, num_queries, chunk):
                solve(start)
        else:
            # One single-threaded stream per core: no fork-join per op, and a core taken by
            # another process slows one stream instead of stalling every parallel op.
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(solve, range(0, num_queries, chunk)))
    return scores_out, ids_out


def _prepare_sweep(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    corpus_chunk: int,
    num_threads: int | None,
    stream_threads: int | None,
    filter_precision: FilterPrecision,
) -> _Sweep:
    """The corpus-side state of a sweep: the filter precision (timed as the sweep's streams
    will run it), the bf16 corpus copy and the per-query error bounds [Q]."""
    with _intra_op_threads(stream_threads):
        bfloat16 = resolve_filter_precision(corpus, filter_precision, corpus_chunk)
    with _intra_op_threads(num_threads):  # passes over the whole corpus use every thread
        norms = input_norms(queries, corpus)
        corpus_bfloat16 = bfloat16_corpus(corpus) if bfloat16 == "bfloat16" else None
    with _intra_op_threads(stream_threads):
        return _Sweep(
            corpus=corpus,
            corpus_bfloat16=corpus_bfloat16,
            error=bound_from_norms(*norms, queries.shape[1], False, queries.device),
            error_bfloat16=bfloat16_filter_bound(queries, norms),
            corpus_chunk=corpus_chunk,
        )


class _Scratch(NamedTuple):
    """Per-worker flat score buffers: float32 [q * n] and bfloat16 [q * n] (empty if unused)."""

    float32: torch.Tensor
    bfloat16: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, columns: int, bfloat16: bool, device: torch.device) -> _Scratch:
        size = rows * columns
        return cls(
            torch.empty(size, device=device),
            torch.empty(size if bfloat16 else 0, dtype=torch.bfloat16, device=device),
        )


@dataclass(frozen=True)
class _Sweep:
    """What every query chunk's sweep shares: the corpus (float32, optional bf16 copy) and the
    per-query score error bounds error [Q] / error_bfloat16 [Q] (see ``score_error_bound``)."""

    corpus: torch.Tensor
    corpus_bfloat16: torch.Tensor | None
    error: torch.Tensor
    error_bfloat16: torch.Tensor
    corpus_chunk: int

    def run(
        self,
        buffer: CandidateBuffer,
        query_start: int,
        excluded: ExcludedPairs | None,
        scratch: _Scratch,
    ) -> None:
        """Feed every corpus chunk's candidates into the buffer of queries from query_start."""
        chunks = self._chunks(excluded)
        queries_bfloat16, bfloat16_error = None, None
        if self.corpus_bfloat16 is not None:
            queries_bfloat16 = buffer.queries.bfloat16()
            bfloat16_error = self.error_bfloat16[
                query_start : query_start + buffer.queries.shape[0]
            ]
        self._seed_threshold(buffer, chunks, scratch, queries_bfloat16, bfloat16_error)
        for chunk in chunks:
            if queries_bfloat16 is not None and bfloat16_error is not None:
                # A float32 score >= threshold implies a bf16 score >= threshold - both errors;
                # the int16 compares in bfloat16_at_least need that to be positive.
                prefilter = buffer.threshold - buffer.error - bfloat16_error
                if bool((prefilter > 0).all()):
                    self._bfloat16_chunk(buffer, queries_bfloat16, prefilter, chunk, scratch)
                    continue
            self._float32_chunk(buffer, chunk, scratch)

    def _chunks(self, excluded: ExcludedPairs | None) -> list[_CorpusChunk]:
        num_items = self.corpus.shape[0]
        bounds = None if excluded is None else excluded.chunk_bounds(num_items, self.corpus_chunk)
        return [
            _CorpusChunk(
                start,
                min(start + self.corpus_chunk, num_items),
                excluded,
                None if bounds is None else bounds[index : index + 2],
            )
            for index, start in enumerate(range(0, num_items, self.corpus_chunk))
        ]

    def _seed_threshold(
        self,
        buffer: CandidateBuffer,
        chunks: list[_CorpusChunk],
        scratch: _Scratch,
        queries_bfloat16: torch.Tensor | None,
        bfloat16_error: torch.Tensor | None,
    ) -> None:
        """Raise the threshold from the group maxima of the first chunks' scores before the
        sweep scores them again (<= 1/_SEED_FRACTION more GEMM work), so the early chunks do
        not flood the buffer while its own k-th score catches up. With the bf16 filter on, the
        seed GEMMs are bf16 too (half the cost, so more of them)."""
        maxima = []
        seed_chunks = _SEED_CHUNKS if queries_bfloat16 is None else _SEED_CHUNKS_BFLOAT16
        for chunk in chunks[: min(seed_chunks, len(chunks) // _SEED_FRACTION)]:
            if chunk.size % _GROUP:
                break
            if queries_bfloat16 is None:
                scores = self._chunk_scores(buffer, chunk, scratch)
                maxima.append(scores.view(scores.shape[0], -1, _GROUP).amax(dim=2))
                continue
            bits = self._bfloat16_scores(queries_bfloat16, chunk, scratch).view(torch.int16)
            # int16 order is bf16 order for non-negative values; a group with none reports
            # some member's score, which still is a score some item reaches.
            group_max = bits.view(bits.shape[0], -1, _GROUP).amax(dim=2)
            maxima.append(group_max.view(torch.bfloat16).float())
        if sum(m.shape[1] for m in maxima) < buffer.k:
            return
        # k disjoint groups reach their maxima: a lower bound on the k-th best score.
        kth = torch.topk(torch.cat(maxima, dim=1), buffer.k, dim=1, sorted=False).values.amin(1)
        if bfloat16_error is not None:
            # bf16 output v~ = bf16(v) has v >= v~ - 2^-8 |v~|; exact >= v - E; float32 >= exact - e.
            kth = kth - 2.0**-8 * kth.abs() - bfloat16_error - buffer.error
        buffer.raise_threshold(kth)

    def _chunk_scores(
        self, buffer: CandidateBuffer, chunk: _CorpusChunk, scratch: _Scratch
    ) -> torch.Tensor:
        """[q, n] float32 GEMM scores of the chunk, excluded pairs at -inf."""
        num_rows = buffer.queries.shape[0]
        scores = scratch.float32[: num_rows * chunk.size].view(num_rows, chunk.size)
        torch.mm(buffer.queries, self.corpus[chunk.start : chunk.stop].T, out=scores)
        chunk.mask_excluded(scores)
        return scores

    def _bfloat16_scores(
        self, queries_bfloat16: torch.Tensor, chunk: _CorpusChunk, scratch: _Scratch
    ) -> torch.Tensor:
        """[q, n] bf16 GEMM scores of the chunk, excluded pairs at -inf."""
        if self.corpus_bfloat16 is None:
            raise RuntimeError("bf16 scores requested without a bf16 corpus")
        num_rows = queries_bfloat16.shape[0]
        scores = scratch.bfloat16[: num_rows * chunk.size].view(num_rows, chunk.size)
        torch.mm(queries_bfloat16, self.corpus_bfloat16[chunk.start : chunk.stop].T, out=scores)
        chunk.mask_excluded(scores)
        return scores

    def _float32_chunk(
        self, buffer: CandidateBuffer, chunk: _CorpusChunk, scratch: _Scratch
    ) -> None:
        """Float32 GEMM of the chunk, entries >= the buffer threshold enter the buffer."""
        scores = self._chunk_scores(buffer, chunk, scratch)
        if chunk.start == 0:
            buffer.raise_threshold(kth_score_lower_bound(scores, buffer.k))
        rows, columns, values = scores_at_least(scores, buffer.threshold)
        buffer.append(rows, columns + chunk.start, values)

    def _bfloat16_chunk(
        self,
        buffer: CandidateBuffer,
        queries_bfloat16: torch.Tensor,
        prefilter: torch.Tensor,
        chunk: _CorpusChunk,
        scratch: _Scratch,
    ) -> None:
        """bf16 GEMM picks pairs scoring >= prefilter [q]; their float32 scores are checked."""
        scores = self._bfloat16_scores(queries_bfloat16, chunk, scratch)
        rows, columns = bfloat16_at_least(scores, prefilter)
        corpus = self.corpus[chunk.start : chunk.stop]
        values = float32_scores(buffer.queries, rows, corpus, columns)
        keep = (values >= buffer.threshold[rows]).nonzero().squeeze(1)  # one nonzero, not 3
        buffer.append(rows[keep], columns[keep] + chunk.start, values[keep])


class _CorpusChunk(NamedTuple):
    """Corpus rows [start, stop) and the slice [lo, hi) of the excluded pairs falling in them."""

    start: int
    stop: int
    excluded: ExcludedPairs | None
    excluded_range: list[int] | None

    @property
    def size(self) -> int:
        return self.stop - self.start

    def mask_excluded(self, scores: torch.Tensor) -> None:
        """Set excluded entries of the chunk's scores [q, size] to -inf."""
        if self.excluded is not None and self.excluded_range is not None:
            lo, hi = self.excluded_range
            self.excluded.mask(scores, self.start, lo, hi)


def bfloat16_at_least(
    scores: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of bf16 scores [q, n] >= threshold [q] (float32, all > 0): rows [m], columns [m].

    For non-negative bf16 values the int16 bit patterns sort like the values and negative ones
    are negative integers, so with a positive threshold the group max and compares run on int16
    (torch's bf16 reductions are ~7x slower than int16 ones).
    """
    bits = scores.view(torch.int16)
    key = threshold.bfloat16()
    # Round the key down to a bf16 <= threshold so nothing at the threshold is missed.
    key_bits = key.view(torch.int16) - (key.float() > threshold).to(torch.int16)
    num_rows, num_columns = scores.shape
    if num_columns % _GROUP:
        rows, columns = (bits >= key_bits.unsqueeze(1)).nonzero(as_tuple=True)
        return rows, columns
    groups_per_row = num_columns // _GROUP
    group_max = bits.view(num_rows, groups_per_row, _GROUP).amax(dim=2)
    group_rows, group_index = (group_max >= key_bits.unsqueeze(1)).nonzero(as_tuple=True)
    flat_groups = bits.view(num_rows * groups_per_row, _GROUP)
    blocks = flat_groups.index_select(0, group_rows * groups_per_row + group_index)
    hit, offset = (blocks >= key_bits[group_rows].unsqueeze(1)).nonzero(as_tuple=True)
    return group_rows[hit], group_index[hit] * _GROUP + offset


def float32_scores(
    queries: torch.Tensor, rows: torch.Tensor, corpus: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """Float32 dot products [m] of pairs (queries[rows[i]], corpus[columns[i]]).

    rows must be ascending with columns ascending within a row (as from nonzero). A sampled
    matmul on the CSR pattern is ~4x faster than gathering both sides.
    """
    num_rows, num_columns = queries.shape[0], corpus.shape[0]
    if rows.numel() == 0:
        return queries.new_zeros(0)
    row_offsets = rows.new_zeros(num_rows + 1)
    torch.cumsum(counts_of_sorted(rows, num_rows), 0, out=row_offsets[1:])
    pattern = torch.sparse_csr_tensor(
        row_offsets,
        columns,
        queries.new_zeros(rows.numel()),
        size=(num_rows, num_columns),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, queries, corpus.T, beta=0.0).values()


def kth_score_lower_bound(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A value [q] <= the k-th largest entry of each row of scores [q, n]; seeds the threshold.

    The k-th largest of the maxima of k disjoint column groups is such a bound and costs
    1/_GROUP of a full top-k; a row with fewer than k entries gets float32 min.
    """
    num_rows, num_columns = scores.shape
    if num_columns % _GROUP == 0 and num_columns // _GROUP >= k:
        scores = scores.view(num_rows, num_columns // _GROUP, _GROUP).amax(dim=2)
    if scores.shape[1] < k:
        return scores.new_full((num_rows,), FLOAT32_MIN)
    return torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1)


def scores_at_least(
    scores: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries of scores [q, n] with value >= threshold [q] of their row.

    Returns rows [m], columns [m], values [m], ordered by (row, column). Groups of ``_GROUP``
    columns are first reduced to their maximum so the compare touches 1/_GROUP of the scores.
    """
    num_rows, num_columns = scores.shape
    if num_columns % _GROUP:
        rows, columns = (scores >= threshold.unsqueeze(1)).nonzero(as_tuple=True)
        return rows, columns, scores[rows, columns]
    groups_per_row = num_columns // _GROUP
    group_max = scores.view(num_rows, groups_per_row, _GROUP).amax(dim=2)
    group_rows, group_index = (group_max >= threshold.unsqueeze(1)).nonzero(as_tuple=True)
    # index_select on a flat [q * groups, _GROUP] view is ~2x faster than 2-D advanced indexing.
    flat_groups = scores.view(num_rows * groups_per_row, _GROUP)
    blocks = flat_groups.index_select(0, group_rows * groups_per_row + group_index)
    hit, offset = (blocks >= threshold[group_rows].unsqueeze(1)).nonzero(as_tuple=True)
    values = blocks.view(-1).index_select(0, hit * _GROUP + offset)
    return group_rows[hit], group_index[hit] * _GROUP + offset, values


@contextlib.contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous)
