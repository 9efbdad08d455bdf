"""Softmax over a candidate set shared by every row, in memory linear in the batch.

The in-batch softmax scores B rows against C shared candidates. Building the [B, C] logits,
masks and log-softmax as separate tensors costs many full passes and O(B * C) memory per
intermediate. Here the logits of ``block_rows`` rows at a time come out of one GEMM into one
reused [block_rows, C] buffer, with the temperature and the per-column bias (logQ, -inf for
padding) folded into its inputs; row-specific exclusions (accidental hits: a candidate with the row's own
positive id) are written by index. The loss is a scalar, so its gradients are known as soon as a
block's softmax is: each block's probabilities feed the two gradient GEMMs right away and the
block is dropped (:class:`SharedSoftmaxCrossEntropy`). Per step that is three GEMMs over the
score block (logits, query gradient, candidate gradient) and four cheap passes over it (row max,
shift, exp, row sum); peak extra memory is O(block_rows * C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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


@dataclass(frozen=True)
class _Exclusions:
    """(row, column) entries dropped for one row each, sorted by row, with each row's range.

    Args:
        rows: [H] int64 sorted.
        columns: [H] int64.
        bounds: [B + 1] int64 on the CPU: row r's entries are ``bounds[r]:bounds[r + 1]``.
    """

    rows: Tensor
    columns: Tensor
    bounds: Tensor

    @classmethod
    def of(cls, rows: Tensor, columns: Tensor, num_rows: int) -> _Exclusions:
        order = rows.argsort(stable=True)
        rows, columns = rows[order], columns[order]
        starts = torch.arange(num_rows + 1, device=rows.device)
        return cls(rows, columns, torch.searchsorted(rows, starts).cpu())

    def apply(self, logits: Tensor, start: int, stop: int) -> None:
        """Sets the excluded entries of rows ``start:stop`` to -inf in ``logits`` [stop-start, C]
        (contiguous)."""
        first, last = int(self.bounds[start]), int(self.bounds[stop])
        if last > first:
            flat = (self.rows[first:last] - start) * logits.shape[1] + self.columns[first:last]
            logits.view(-1).index_fill_(0, flat, float("-inf"))


class SharedSoftmaxCrossEntropy(torch.autograd.Function):
    """sum_i w_i * softplus(lse_i - p_i) / sum_i w_i, with
    lse_i = log sum_j exp(q_i . c_j + bias_j) over the columns j not excluded for row i.

    ``softplus(lse_i - p_i) = logaddexp(p_i, lse_i) - p_i`` is row i's cross-entropy with its
    positive logit p_i against those columns. The output is a scalar, so forward computes the
    gradients of query, candidates and positive block by block and backward only scales them by
    the incoming gradient. ``bias`` and the weights take no gradient; no double backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: Tensor,
        candidates: Tensor,
        positive: Tensor,
        bias: Tensor,
        exclusions: _Exclusions,
        row_weights: Tensor,
        block_rows: int,
        with_gradients: bool,
    ) -> Tensor:
        rows, num_candidates = query.shape[0], candidates.shape[0]
        scale = row_weights / row_weights.sum().clamp_min(1e-12)  # d loss / d per-row loss
        lse = query.new_empty(rows)
        grad_query = torch.empty_like(query) if with_gradients else None
        grad_candidates = torch.zeros_like(candidates) if with_gradients else None
        grad_positive = torch.empty_like(positive) if with_gradients else None
        # The bias rides in the GEMM as one more input column: [q, 1] . [c, bias].
        query_ones = torch.cat([query, query.new_ones(rows, 1)], dim=1)
        candidates_bias_t = torch.cat([candidates, bias.unsqueeze(1)], dim=1).T
        buffer = query.new_empty(min(block_rows, rows), num_candidates)
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            logits = torch.mm(query_ones[start:stop], candidates_bias_t, out=buffer[: stop - start])
            exclusions.apply(logits, start, stop)
            peak = logits.amax(dim=1, keepdim=True)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            total = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)  # logits now exp(l - peak)
            lse[start:stop] = (total.log() + peak).squeeze(1)
            if grad_query is None or grad_candidates is None or grad_positive is None:
                continue
            # d loss / d lse_i = scale_i * sigmoid(lse_i - p_i); softmax_ij = exp_ij / total_i.
            d_lse = scale[start:stop] * torch.sigmoid(lse[start:stop] - positive[start:stop])
            grad_positive[start:stop] = -d_lse
            row_factor = torch.where(total > 0, d_lse.unsqueeze(1) / total, torch.zeros_like(total))
            block_query = grad_query[start:stop]
            torch.mm(logits, candidates, out=block_query)
            block_query.mul_(row_factor)
            grad_candidates.addmm_(logits.T, row_factor * query[start:stop])
        per_row = torch.nn.functional.softplus(lse - positive).where(torch.isfinite(lse), 0.0)
        if with_gradients:
            ctx.save_for_backward(grad_query, grad_candidates, grad_positive)
        return (per_row * scale).sum()

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:  # type: ignore[override]
        grad_query, grad_candidates, grad_positive = ctx.saved_tensors
        return (
            grad_query * grad_loss,
            grad_candidates * grad_loss,
            grad_positive * grad_loss,
            None,
            None,
            None,
            None,
            None,
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
        row_weights: [B] >= 0 (no gradient).
        mask_accidental_hits: drop candidates sharing the positive's id.
        block_rows: rows per scored block (the memory bound: one [block_rows, C] buffer).
    Returns:
        scalar: sum_i w_i * CE_i / sum_i w_i (0 when every weight is 0).
    """
    query = user / temperature
    log_q = candidate_log_q.detach()
    positive = (query * candidates[positive_index]).sum(dim=1) - log_q[positive_index]
    bias = torch.where(candidate_ids >= 0, -log_q, torch.full_like(log_q, float("-inf")))
    own_rows = torch.arange(user.shape[0], device=user.device)
    if mask_accidental_hits:
        rows, columns = hit_pairs(torch.where(positive_ids >= 0, positive_ids, -1), candidate_ids)
        rows, columns = torch.cat([rows, own_rows]), torch.cat([columns, positive_index])
    else:
        rows, columns = own_rows, positive_index
    with_gradients = torch.is_grad_enabled() and (query.requires_grad or candidates.requires_grad)
    return SharedSoftmaxCrossEntropy.apply(
        query,
        candidates,
        positive,
        bias.to(query.dtype),
        _Exclusions.of(rows, columns, user.shape[0]),
        row_weights.detach().to(query.dtype),
        max(1, block_rows),
        with_gradients,
    )
