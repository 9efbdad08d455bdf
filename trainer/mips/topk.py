"""Exact maximum-inner-product top-K, single process and with the corpus sharded across ranks.

Exactness contract: the returned ids equal a float64 brute force (every score computed in
float64 from the float32 inputs, items ordered by score descending then id ascending, excluded
items removed, missing slots padded with score -inf and id -1). Returned scores are the float64
scores rounded to float32.

This module holds the API, the input checks and the distributed merge; the blocked sweep that
makes ``exact_topk`` fast while staying exact (float32/bf16 filters with error bounds, float64
rescoring) lives in ``trainer.mips.sweep``, whose docstring gives the argument; the error bounds
and the filter-precision choice live in ``trainer.mips.precision``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

from trainer.mips.candidates import ExcludedPairs, sort_by_score_then_id
from trainer.mips.precision import (
    FilterPrecision,
    bound_from_norms,
    input_norms,
    resolve_filter_precision,
)
from trainer.mips.sweep import sweep_topk


class ItemLists(NamedTuple):
    """Per-query lists of item ids in CSR form (exclusions, relevant items).

    Args:
        offsets: [Q + 1] int64, non-decreasing, offsets[0] == 0; query q owns
            ``ids[offsets[q]:offsets[q + 1]]``.
        ids: [nnz] int64 item ids.
    """

    offsets: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> ItemLists:
        """Build from one Python list of item ids per query."""
        lengths = torch.tensor([len(items) for items in lists], dtype=torch.int64)
        offsets = torch.zeros(len(lists) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        ids = torch.tensor([i for items in lists for i in items], dtype=torch.int64)
        return cls(offsets, ids)

    @property
    def num_lists(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> torch.Tensor:
        """[Q] int64 list lengths."""
        return self.offsets[1:] - self.offsets[:-1]

    def rows(self) -> torch.Tensor:
        """[nnz] int64: the query index owning each id."""
        queries = torch.arange(self.num_lists, device=self.offsets.device)
        return torch.repeat_interleave(queries, self.lengths())

    def slice(self, start: int, stop: int) -> ItemLists:
        """The lists of queries [start, stop), offsets rebased to 0."""
        offsets = self.offsets[start : stop + 1]
        base = int(offsets[0]) if offsets.numel() else 0
        return ItemLists(offsets - base, self.ids[base : int(offsets[-1])])


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``n`` items owned by ``rank``; shard sizes differ by <= 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def score_error_bound(
    queries: torch.Tensor, corpus: torch.Tensor, *, bfloat16: bool = False
) -> torch.Tensor:
    """Bound on |matmul score - exact score| for each query against any corpus item.

    Args:
        queries: [Q, D] float32.
        corpus: [N, D] float32.
        bfloat16: bound a bf16 x bf16 -> bf16 matmul (fp32 accumulation) instead of float32.
    Returns:
        [Q] float32: 2 f |q| max_n |c_n| + D 2^-126 (1 + |q| + max_n |c_n|), with
        f = (2 u_in + u_in^2) + gamma_D (1 + u_in)^2 + u_out (1 + gamma_D) (1 + u_in)^2:
        input rounding u_in, fp32 accumulation gamma_D = D u / (1 - D u) with u = 2^-24 (any
        summation order), output rounding u_out. u_in = u_out = 2^-8 for bf16; u_in = 2^-8
        also for float32 under reduced matmul precision (TF32 or bf16 inside), else 0. The
        absolute term covers flush-to-zero of subnormals.
    """
    query_norms, max_norm = input_norms(queries, corpus)
    return bound_from_norms(query_norms, max_norm, queries.shape[1], bfloat16, queries.device)


def exact_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    corpus_ids: torch.Tensor | None = None,
    exclude: ItemLists | None = None,
    query_chunk: int = 1024,
    corpus_chunk: int = 8192,
    num_threads: int | None = None,
    filter_precision: FilterPrecision = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` items by inner product for every query, ties broken by lower item id.

    Args:
        queries: [Q, D] float32.
        corpus: [N, D] float32.
        k: results per query (> 0); slots beyond the valid items hold score -inf and id -1.
        corpus_ids: [N] int64 unique item ids of the corpus rows; default ``arange(N)``.
        exclude: Q per-query lists of item ids (in ``corpus_ids`` space) never returned for
            that query, e.g. the user's training history. Ids absent from the corpus are ignored.
        query_chunk, corpus_chunk: block sizes; each worker's score scratch is
            query_chunk * corpus_chunk (float32, plus bf16 when used) and nothing of size Q * N
            is ever allocated.
        num_threads: CPU worker threads, each over whole query chunks with torch set to one
            intra-op thread for the call (the setting is restored after); None means
            ``torch.get_num_threads()`` (all cores by default). On GPU it is ignored.
        filter_precision: precision of the GEMM that picks candidates (the answer is exact
            either way): "bfloat16" uses a bf16 copy of the corpus (2 bytes per value) and a
            ~2x cheaper GEMM where the CPU has native bf16 dot products; "auto" picks it on
            CPU for corpora of >= 4 chunks when a one-off timing shows bf16 matmul faster.
            GPUs always filter in float32 (their bf16 GEMMs may reduce in bf16).
    Returns:
        scores: [Q, k] float32, the float64 scores rounded, descending.
        ids: [Q, k] int64 item ids; equal scores come in ascending id order.
    """
    scores, ids = _exact_topk_float64(
        queries,
        corpus,
        k,
        corpus_ids,
        exclude,
        query_chunk,
        corpus_chunk,
        num_threads,
        filter_precision,
    )
    return scores.float(), ids


def bruteforce_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    corpus_ids: torch.Tensor | None = None,
    exclude: ItemLists | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow float64 reference with the same contract as ``exact_topk`` (tests, benchmarks).

    Materializes [Q, N] float64 scores and fully sorts each row; use on small inputs or a few
    queries. Args and returns as in ``exact_topk``, except scores are [Q, k] float64.
    """
    num_items = corpus.shape[0]
    ids = _corpus_ids_or_arange(corpus_ids, num_items, corpus.device)
    scores = queries.double() @ corpus.double().T
    if exclude is not None:
        banned = exclude.ids.unsqueeze(1) == ids.unsqueeze(0)
        rows, cols = banned.nonzero(as_tuple=True)
        scores[exclude.rows()[rows], cols] = float("-inf")
    top_scores, top_ids, _ = sort_by_score_then_id(scores, ids.expand_as(scores), k)
    return top_scores, top_ids


def distributed_topk(
    local_queries: torch.Tensor,
    local_corpus: torch.Tensor,
    local_corpus_ids: torch.Tensor,
    k: int,
    group: dist.ProcessGroup | None = None,
    exclude: ItemLists | None = None,
    *,
    query_chunk: int = 1024,
    corpus_chunk: int = 8192,
    filter_precision: FilterPrecision = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of every rank's queries against the corpus sharded across ``group``.

    All-gathers the queries (and their exclusion lists), scores all of them against the local
    shard with ``exact_topk``, sends each rank the shard results for its own queries with one
    all_to_all, and merges them by (float64 score desc, id asc). Same path for world size 1,
    gloo and NCCL; every tensor must live on the group's device.

    Args:
        local_queries: [q_r, D] float32; q_r may differ between ranks (0 allowed).
        local_corpus: [n_r, D] float32, this rank's corpus shard (0 rows allowed).
        local_corpus_ids: [n_r] int64 global item ids of the shard, unique across all ranks.
        k: results per query.
        group: process group; default the world.
        exclude: q_r lists of item ids excluded for this rank's queries; pass it on every
            rank or on none (it travels with the gathered queries).
        query_chunk, corpus_chunk, filter_precision: as in ``exact_topk``.
    Returns:
        scores: [q_r, k] float32 (float64 scores rounded), ids: [q_r, k] int64; as if one
        process ran ``exact_topk`` on the whole corpus.
    """
    if not dist.is_initialized():
        raise RuntimeError("distributed_topk needs an initialized process group (size 1 is fine)")
    all_queries, query_counts = _all_gather_rows(local_queries, group)
    all_exclude = None
    if exclude is not None:
        device = local_queries.device
        local_exclude = ItemLists(exclude.offsets.to(device), exclude.ids.to(device))
        all_exclude = _all_gather_item_lists(local_exclude, group)
    scores, ids = _exact_topk_float64(
        all_queries,
        local_corpus,
        k,
        local_corpus_ids,
        all_exclude,
        query_chunk,
        corpus_chunk,
        None,
        filter_precision,
    )
    top_scores, top_ids = _merge_shard_answers(scores, ids, query_counts, k, group)
    return top_scores.float(), top_ids


def _merge_shard_answers(
    scores: torch.Tensor,
    ids: torch.Tensor,
    query_counts: list[int],
    k: int,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard answers for every rank's queries ([sum(q), k] float64 scores and
    ids) -> the merged top-``k`` of this rank's own queries ([q_r, k]); one all_to_all."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    num_local = query_counts[rank]
    received_scores = scores.new_empty(world_size * num_local, k)
    received_ids = ids.new_empty(world_size * num_local, k)
    # Rank j receives rows [sum(q_<j), sum(q_<=j)) of every shard's answer.
    splits = [num_local] * world_size
    dist.all_to_all_single(received_scores, scores, splits, query_counts, group=group)
    dist.all_to_all_single(received_ids, ids, splits, query_counts, group=group)
    # [W * q_r, k] -> [q_r, W * k]: every shard's candidates for each local query side by side.
    merged_scores = received_scores.view(world_size, num_local, k).permute(1, 0, 2)
    merged_ids = received_ids.view(world_size, num_local, k).permute(1, 0, 2)
    top_scores, top_ids, _ = sort_by_score_then_id(
        merged_scores.reshape(num_local, world_size * k),
        merged_ids.reshape(num_local, world_size * k),
        k,
    )
    return top_scores, top_ids


def _exact_topk_float64(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    corpus_ids: torch.Tensor | None,
    exclude: ItemLists | None,
    query_chunk: int,
    corpus_chunk: int,
    num_threads: int | None,
    filter_precision: FilterPrecision = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``exact_topk`` with float64 scores [Q, k] (what the distributed merge needs)."""
    _check_inputs(queries, corpus, k, corpus_ids, exclude, query_chunk, corpus_chunk)
    if filter_precision not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"filter_precision must be auto|bfloat16|float32, got {filter_precision}")
    num_queries, num_items, device = queries.shape[0], corpus.shape[0], queries.device
    ids = _corpus_ids_or_arange(corpus_ids, num_items, device)
    if num_queries == 0 or num_items == 0:
        scores = torch.full((num_queries, k), float("-inf"), dtype=torch.float64, device=device)
        return scores, torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    excluded = None if exclude is None else ExcludedPairs.build(exclude.rows(), exclude.ids, ids)
    return sweep_topk(
        queries,
        corpus,
        ids,
        k,
        excluded,
        query_chunk,
        corpus_chunk,
        num_threads,
        filter_precision,
    )


def resolved_filter_precision(
    corpus: torch.Tensor, filter_precision: FilterPrecision = "auto", corpus_chunk: int = 8192
) -> Literal["bfloat16", "float32"]:
    """The candidate-GEMM precision ``exact_topk`` will use for corpus [N, D] (see there)."""
    return resolve_filter_precision(corpus, filter_precision, corpus_chunk)


def _corpus_ids_or_arange(
    corpus_ids: torch.Tensor | None, num_items: int, device: torch.device
) -> torch.Tensor:
    if corpus_ids is None:
        return torch.arange(num_items, device=device)
    return corpus_ids.to(device=device, dtype=torch.int64)


def _all_gather_rows(
    local: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's local [n_r, ...] in rank order; also return the n_r."""
    world_size = dist.get_world_size(group)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = local.new_zeros((max(max(sizes), 1), *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sizes


def _all_gather_item_lists(local: ItemLists, group: dist.ProcessGroup | None) -> ItemLists:
    """Concatenate every rank's per-query lists in rank order (matches gathered queries)."""
    lengths, _ = _all_gather_rows(local.lengths(), group)
    ids, _ = _all_gather_rows(local.ids, group)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return ItemLists(offsets, ids)


def _check_inputs(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    corpus_ids: torch.Tensor | None,
    exclude: ItemLists | None,
    query_chunk: int,
    corpus_chunk: int,
) -> None:
    if queries.dim() != 2 or corpus.dim() != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"queries [Q, D] and corpus [N, D] must share D; got {tuple(queries.shape)} "
            f"and {tuple(corpus.shape)}"
        )
    if queries.dtype != torch.float32 or corpus.dtype != torch.float32:
        raise ValueError(f"expected float32 inputs, got {queries.dtype} and {corpus.dtype}")
    if k < 1 or query_chunk < 1 or corpus_chunk < 1:
        raise ValueError(
            f"k={k}, query_chunk={query_chunk}, corpus_chunk={corpus_chunk} must be >= 1"
        )
    if corpus_ids is not None and tuple(corpus_ids.shape) != (corpus.shape[0],):
        raise ValueError(f"corpus_ids must be [{corpus.shape[0]}], got {tuple(corpus_ids.shape)}")
    if exclude is not None:
        if exclude.num_lists != queries.shape[0]:
            raise ValueError(
                f"exclude has {exclude.num_lists} lists for {queries.shape[0]} queries"
            )
        if int(exclude.offsets[-1]) != exclude.ids.numel():
            raise ValueError("exclude.offsets[-1] must equal len(exclude.ids)")
