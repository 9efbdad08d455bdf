"""Softmax over a candidate set shared by every row, in memory linear in the batch.

The in-batch softmax scores B rows against C shared candidates. Building the [B, C] logits,
masks and log-softmax as separate tensors costs many full passes and O(B * C) memory per
intermediate. Here the logits of ``block_rows`` rows at a time come out of one GEMM with the
temperature and the per-column bias (logQ, -inf for padding) folded in, row-specific exclusions
(accidental hits: a candidate with the row's own positive id) are written by index, and only the
per-row logsumexp [B] is kept; backward recomputes each block (:class:`BlockedLogSumExp`).
Peak extra memory is O(block_rows * C).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.losses import weighted_mean


def hit_pairs(row_ids: Tensor, candidate_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Every (row, column) with ``candidate_ids[column] == row_ids[row]``, without a [B, C] mask.

    Args:
        row_ids: [B] int64 (a negative id matches nothing).
        candidate_ids: [C] int64.
    Returns:
        rows [H], columns [H] int64, H the number of matches (sort + searchsorted:
        O((B + C) log C + H)).
    """
    sorted_ids, order = candidate_ids.sort()
    low = torch.searchsorted(sorted_ids, row_ids, right=False)
    high = torch.searchsorted(sorted_ids, row_ids, right=True)
    counts = torch.where(row_ids >= 0, high - low, torch.zeros_like(low))
    rows = torch.repeat_interleave(torch.arange(row_ids.shape[0], device=row_ids.device), counts)
    starts = torch.repeat_interleave(low, counts)
    offsets = torch.arange(rows.shape[0], device=row_ids.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    return rows, order[starts + offsets]


def _block_logits(
    query: Tensor, candidates_t: Tensor, bias: Tensor, start: int, stop: int, hits: tuple
) -> Tensor:
    """[stop - start, C] logits q c^T + bias with the block's hits set to -inf."""
    logits = torch.addmm(bias.unsqueeze(0), query[start:stop], candidates_t)
    rows, columns, bounds = hits
    first, last = int(bounds[start]), int(bounds[stop])
    if last > first:
        logits[rows[first:last] - start, columns[first:last]] = float("-inf")
    return logits


class BlockedLogSumExp(torch.autograd.Function):
    """lse_i = log sum_j exp(q_i . c_j + bias_j) over the columns j not excluded for row i.

    Forward keeps only lse [B]; backward recomputes each block's logits, so the extra memory
    is one [block_rows, C] block: forward one GEMM and the logsumexp's passes, backward one
    GEMM, one exp in place and two GEMMs reading the block. ``bias`` takes no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: Tensor,
        candidates: Tensor,
        bias: Tensor,
        hit_rows: Tensor,
        hit_columns: Tensor,
        block_rows: int,
    ) -> Tensor:
        rows = query.shape[0]
        # Hits sorted by row, with each block's range found by searchsorted.
        order = hit_rows.argsort(stable=True)
        hit_rows, hit_columns = hit_rows[order], hit_columns[order]
        starts = torch.arange(0, rows + 1, device=query.device).clamp_max(rows)
        bounds = torch.searchsorted(hit_rows, starts).cpu()
        hits = (hit_rows, hit_columns, bounds)
        candidates_t = candidates.detach().T
        lse = query.new_empty(rows)
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            logits = _block_logits(query.detach(), candidates_t, bias, start, stop, hits)
            lse[start:stop] = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(query, candidates, bias, hit_rows, hit_columns, bounds, lse)
        ctx.block_rows = block_rows
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: Tensor) -> tuple:  # type: ignore[override]
        query, candidates, bias, hit_rows, hit_columns, bounds, lse = ctx.saved_tensors
        hits = (hit_rows, hit_columns, bounds)
        need_query, need_candidates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_query = torch.zeros_like(query) if need_query else None
        grad_candidates = torch.zeros_like(candidates) if need_candidates else None
        # A row with every column excluded has lse = -inf and probabilities 0.
        safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        candidates_t = candidates.T
        rows = query.shape[0]
        for start in range(0, rows, ctx.block_rows):
            stop = min(start + ctx.block_rows, rows)
            logits = _block_logits(query, candidates_t, bias, start, stop, hits)
            probs = logits.sub_(safe_lse[start:stop].unsqueeze(1)).exp_()  # softmax, in place
            scale = grad_lse[start:stop].unsqueeze(1)
            if grad_query is not None:
                grad_query[start:stop] = scale * (probs @ candidates)
            if grad_candidates is not None:
                grad_candidates.addmm_(probs.T, scale * query[start:stop])
        return grad_query, grad_candidates, None, None, None, None


def blocked_logsumexp(
    query: Tensor,
    candidates: Tensor,
    bias: Tensor,
    exclude: tuple[Tensor, Tensor],
    block_rows: int,
) -> Tensor:
    """Per-row logsumexp of ``query @ candidates.T + bias`` without the excluded entries.

    Args:
        query: [B, D] (already divided by the temperature).
        candidates: [C, D].
        bias: [C] per-column additive term (-log q; -inf drops a column for every row).
        exclude: (rows [H], columns [H]) entries dropped for one row each.
        block_rows: rows scored at a time (the memory bound).
    Returns:
        [B] (-inf for a row with no column left).
    """
    rows, columns = exclude
    return BlockedLogSumExp.apply(
        query, candidates, bias.detach().to(query.dtype), rows, columns, max(1, block_rows)
    )


def shared_softmax_loss(
    user: Tensor,
    candidates: Tensor,
    candidate_ids: Tensor,
    candidate_log_q: Tensor,
    positive_index: Tensor,
    positive_ids: Tensor,
    temperature: Tensor | float,
    row_weights: Tensor,
    mask_accidental_hits: bool,
    block_rows: int,
) -> Tensor:
    """Softmax of each row's positive against the shared candidates, in linear memory.

    Row i's logits are ``s_ij / t - logQ_j``; its negatives are every candidate except padding
    (id -1), its own positive's column and, with ``mask_accidental_hits``, every candidate
    with its positive's id. Equal to :func:`models.loss_families.sampled_listwise_softmax_loss`
    over the materialized layout.

    Args:
        user: [B, D] query embeddings.
        candidates: [C, D] shared candidate embeddings.
        candidate_ids: [C] int64, -1 padding.
        candidate_log_q: [C] logQ of each candidate (0: none; no gradient).
        positive_index: [B] int64 column of row i's positive among the candidates.
        positive_ids: [B] int64 id of each row's positive.
        temperature: [] or float.
        row_weights: [B] >= 0.
        mask_accidental_hits: drop candidates sharing the positive's id.
        block_rows: rows per scored block.
    Returns:
        scalar: sum_i w_i * CE_i / sum_i w_i.
    """
    query = user / temperature
    positive = (query * candidates[positive_index]).sum(dim=1) - candidate_log_q[positive_index]
    bias = torch.where(
        candidate_ids >= 0, -candidate_log_q, torch.full_like(candidate_log_q, float("-inf"))
    )
    if mask_accidental_hits:
        rows, columns = hit_pairs(torch.where(positive_ids >= 0, positive_ids, -1), candidate_ids)
        own_rows = torch.arange(user.shape[0], device=user.device)
        rows = torch.cat([rows, own_rows])
        columns = torch.cat([columns, positive_index])
    else:
        rows = torch.arange(user.shape[0], device=user.device)
        columns = positive_index
    lse = blocked_logsumexp(query, candidates, bias, (rows, columns), block_rows)
    per_row = torch.logaddexp(positive, lse) - positive
    return weighted_mean(per_row, row_weights)
