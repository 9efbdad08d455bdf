"""One entry point for every loss family over a row-wise candidate layout.

Whatever the negatives' source (in-batch, global, corpus samples, memory, hard negatives), the
trainer lays them out per row as :class:`ScoredCandidates`; :func:`retrieval_loss` dispatches on
:class:`config.LossFamily` through a registry of pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from config import LossConfig, LossFamily
from models.loss_families import (
    bpr_loss,
    cosine_regression_loss,
    sampled_listwise_softmax_loss,
    sigmoid_cross_entropy_loss,
    triplet_hinge_loss,
)


@dataclass
class ScoredCandidates:
    """Scores of each row's positive and negatives (raw inner products, before temperature).

    Args:
        positive: [B] s(u_i, i+).
        negatives: [B, N] s(u_i, j) for every candidate j of row i.
        weights: [B, N] >= 0; 0 excludes a candidate from row i (padding, accidental hit, the
            positive itself); w counts it as w negatives (hard-negative weight).
        positive_log_q: [B] logQ correction of the positive (0: none).
        negative_log_q: [B, N] logQ correction of the negatives (0: none).
        ids: [B, N] int64 item id of each candidate (-1 padding), for inspection and for
            losses that score candidates with another model; None when unknown.
    """

    positive: torch.Tensor
    negatives: torch.Tensor
    weights: torch.Tensor
    positive_log_q: torch.Tensor
    negative_log_q: torch.Tensor
    ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor, valid: torch.Tensor) -> ScoredCandidates:
        """Keep the columns ``index`` [B, k] of each row; ``valid`` [B, k] False zeroes one."""
        weights = self.weights.gather(1, index) * valid.to(self.weights.dtype)
        return ScoredCandidates(
            self.positive,
            self.negatives.gather(1, index),
            weights,
            self.positive_log_q,
            self.negative_log_q.gather(1, index),
            None if self.ids is None else self.ids.gather(1, index),
        )


def sample_negative_columns(
    weights: torch.Tensor, count: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct valid columns per row of a [B, N] weight layout (weight > 0 is
    valid), uniformly at random, in O(B * count): :func:`sample_valid_columns` on it."""
    flat = weights.reshape(-1)
    columns = weights.shape[1]

    def is_valid(rows: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        return flat[rows.unsqueeze(1) * columns + draws] > 0

    return sample_valid_columns(
        weights.shape[0], columns, count, is_valid, generator, weights.device
    )


ValidColumns = Callable[[Tensor, Tensor], Tensor]


def sample_valid_columns(
    rows: int,
    columns: int,
    count: int,
    is_valid: ValidColumns,
    generator: torch.Generator | None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct valid columns per row, uniformly at random, in O(B * count).

    Each row draws columns uniformly with replacement and keeps, in draw order, the first
    ``count`` distinct valid ones (rejection: uniform over the count-subsets of its valid
    columns). A row that does not fill up in a few rounds of draws (few valid columns) falls
    back to :func:`_all_columns_sample`, the same distribution over its N columns.

    Args:
        rows: B.
        columns: N, the candidates of every row.
        count: k, columns per row.
        is_valid: ``(row [P], column [P, m]) -> [P, m] bool``, whether column may be a
            negative of that row; called on the drawn entries only (and on whole rows for the
            fallback's rare rows).
        generator: seeded generator (on ``device``) for reproducible draws.
        device: where the draws live (default: the generator's, else CPU).
    Returns:
        index [B, min(k, N)] int64 and valid [B, min(k, N)] bool (False where a row had fewer
        than k valid candidates).
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    k = min(count, columns)
    if columns <= 4 * k or rows == 0:
        return _all_columns_sample(
            _row_validity(torch.arange(rows, device=device), columns, is_valid), k, generator
        )
    index = torch.zeros(rows, k, dtype=torch.int64, device=device)
    valid = torch.ones(rows, k, dtype=torch.bool, device=device)
    pending = torch.arange(rows, device=device)
    for draws_per_row in (2 * k + 8, 8 * k + 16):
        draws = torch.randint(
            columns, (pending.shape[0], draws_per_row), generator=generator, device=device
        )
        keep = is_valid(pending, draws) & _first_occurrences(draws)
        taken = keep.cumsum(dim=1)
        full = taken[:, -1] >= k
        chosen = keep[full] & (taken[full] <= k)
        index[pending[full]] = draws[full][chosen].view(-1, k)
        pending = pending[~full]
        if pending.numel() == 0:
            return index, valid
    rest_index, rest_valid = _all_columns_sample(
        _row_validity(pending, columns, is_valid), k, generator
    )
    index[pending], valid[pending] = rest_index, rest_valid
    return index, valid


def _row_validity(rows: Tensor, columns: int, is_valid: ValidColumns) -> Tensor:
    """[P, N] bool: every column of the given rows."""
    every = torch.arange(columns, device=rows.device).expand(rows.shape[0], columns)
    return is_valid(rows, every)


def _first_occurrences(draws: torch.Tensor) -> torch.Tensor:
    """[P, m] bool: True at the first draw of each value within its row."""
    ordered, order = draws.sort(dim=1, stable=True)
    repeat = torch.zeros_like(draws, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = torch.empty_like(repeat)
    first.scatter_(1, order, ~repeat)
    return first


def _all_columns_sample(
    valid: torch.Tensor, k: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact draw over every column: the top-k of uniform keys among valid columns
    (``valid`` [P, N] bool)."""
    keys = torch.rand(valid.shape, generator=generator, device=valid.device)
    keys = keys.masked_fill(~valid, -1.0)
    top = keys.topk(k, dim=1)
    return top.indices, top.values >= 0


LossFunction = Callable[[ScoredCandidates, Tensor, Tensor, LossConfig], Tensor]


def _softmax(s: ScoredCandidates, t: Tensor, w: Tensor, config: LossConfig) -> Tensor:
    return sampled_listwise_softmax_loss(
        s.positive, s.negatives, t, w, s.weights, s.positive_log_q, s.negative_log_q
    )


def _sigmoid(s: ScoredCandidates, t: Tensor, w: Tensor, config: LossConfig) -> Tensor:
    logits = torch.cat([s.positive.unsqueeze(1), s.negatives], dim=1) / t
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return sigmoid_cross_entropy_loss(logits, labels, w, _with_positive(s.weights))


def _cosine(s: ScoredCandidates, t: Tensor, w: Tensor, config: LossConfig) -> Tensor:
    scores = torch.cat([s.positive.unsqueeze(1), s.negatives], dim=1)  # raw cosines, no t
    return cosine_regression_loss(scores, w, s.negatives.shape[1], _with_positive(s.weights))


def _triplet(s: ScoredCandidates, t: Tensor, w: Tensor, config: LossConfig) -> Tensor:
    # The margin is in score units, so no temperature.
    return triplet_hinge_loss(s.positive, s.negatives, config.margin, w, s.weights)


def _bpr(s: ScoredCandidates, t: Tensor, w: Tensor, config: LossConfig) -> Tensor:
    return bpr_loss(s.positive / t, s.negatives / t, w, s.weights)


def _with_positive(weights: Tensor) -> Tensor:
    """[B, N] negative weights -> [B, 1 + N] entry weights with the positive counted once."""
    return torch.cat([torch.ones_like(weights[:, :1]), weights], dim=1)


LOSSES: dict[LossFamily, LossFunction] = {
    LossFamily.SOFTMAX: _softmax,
    LossFamily.SAMPLED_SOFTMAX: _softmax,
    LossFamily.SIGMOID: _sigmoid,
    LossFamily.COSINE: _cosine,
    LossFamily.TRIPLET: _triplet,
    LossFamily.BPR: _bpr,
}


def retrieval_loss(
    scored: ScoredCandidates,
    temperature: torch.Tensor,
    row_weights: torch.Tensor,
    config: LossConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The configured family's loss (scalar).

    Softmax families use temperature, logQ corrections and log-weights; ``sigmoid`` and
    ``bpr`` use score / temperature and weight each negative's term; ``cosine`` and
    ``triplet`` work on raw scores. With ``loss.negatives_per_row`` set, every family except
    ``softmax`` first keeps that many random valid negatives per row.

    Args:
        scored: per-row positive and negative scores.
        temperature: [] scalar.
        row_weights: [B] >= 0 (net user value times the padding mask).
        config: the loss section (family, negatives_per_row, margin).
        generator: seeded generator for per-row negative sampling.
    """
    if config.negatives_per_row is not None:
        index, valid = sample_negative_columns(scored.weights, config.negatives_per_row, generator)
        scored = scored.select(index, valid)
    return family_loss(scored, temperature, row_weights, config)


def family_loss(
    scored: ScoredCandidates, temperature: Tensor, row_weights: Tensor, config: LossConfig
) -> Tensor:
    """The configured family's loss over exactly the columns of ``scored`` (no sampling: for
    a layout whose negatives were drawn already)."""
    return LOSSES[config.family](scored, temperature, row_weights, config)
