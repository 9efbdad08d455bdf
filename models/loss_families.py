"""Pointwise, pairwise and listwise retrieval losses as pure functions of scores.

Every loss reduces per-row losses ``l_i`` with row weights ``w_i >= 0`` as
``sum_i w_i * l_i / sum_i w_i``, like :func:`models.losses.sampled_softmax_loss`, and returns 0
(still attached to the gradient graph) when all weights are 0. Full in-batch softmax lives in
:func:`models.losses.in_batch_softmax_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.losses import weighted_mean


def _masked_row_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean of values [B, N] with entry weights [B, N] (bool or float >= 0; 0 or
    False excludes an entry); 0 for rows with no weight."""
    if weights is None:
        return values.mean(dim=1)
    weights = weights.to(values.dtype)
    # where (not multiply) so an excluded nan/inf never leaks into the value or its gradient.
    kept = torch.where(weights > 0, values * weights, torch.zeros_like(values))
    return kept.sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


def sigmoid_cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pointwise binary cross entropy of sigmoid(logits) against labels.

    Args:
        logits: [B, C] raw scores.
        labels: [B, C] targets in [0, 1].
        row_weights: [B] >= 0.
        mask: [B, C] entry weights, bool or float >= 0 (False / 0 excludes); None counts every
            entry once.
    Returns:
        scalar: weighted mean over rows of each row's weighted mean BCE over its entries
        (a row with no valid entry has loss 0).
    """
    per_entry = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return weighted_mean(_masked_row_mean(per_entry, mask), row_weights)


def cosine_regression_loss(
    scores: torch.Tensor,
    row_weights: torch.Tensor,
    negatives_per_positive: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error pulling the positive's cosine to +1 and the negatives' to -1.

    Args:
        scores: [B, 1 + N] cosine similarities; column 0 is the positive, the rest negatives.
        row_weights: [B] >= 0.
        negatives_per_positive: k, the positive:negative ratio 1:k; only the first k negatives
            (columns 1..k) are used. Must satisfy 0 <= k <= N.
        mask: [B, 1 + N] entry weights (bool or float >= 0) as in
            :func:`sigmoid_cross_entropy_loss`; None counts every used entry once.
    Returns:
        scalar: weighted mean over rows of ``((s+ - 1)^2 + sum_j (s-_j + 1)^2) / (1 + k)``
        (entry-weighted when a mask is given).
    """
    available = scores.shape[1] - 1
    if negatives_per_positive < 0 or negatives_per_positive > available:
        raise ValueError(
            f"negatives_per_positive={negatives_per_positive}: expected between 0 and the "
            f"{available} negative column(s) of scores with shape {tuple(scores.shape)}"
        )
    used = scores[:, : 1 + negatives_per_positive]
    targets = torch.full_like(used, -1.0)
    targets[:, 0] = 1.0
    entry_weights = None if mask is None else mask[:, : 1 + negatives_per_positive]
    per_row = _masked_row_mean((used - targets).square(), entry_weights)
    return weighted_mean(per_row, row_weights)


def triplet_hinge_loss(
    positive_scores: torch.Tensor,
    negative_scores: torch.Tensor,
    margin: float,
    row_weights: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise hinge: each negative should score at least ``margin`` below the positive.

    Args:
        positive_scores: [B] score of each row's positive.
        negative_scores: [B, N] scores of each row's negatives.
        margin: m >= 0.
        row_weights: [B] >= 0.
        negative_mask: [B, N] negative weights, bool or float >= 0 (False / 0 excludes; w counts
            the negative w times); None treats all as valid with weight 1.
    Returns:
        scalar: weighted mean over rows of ``mean_j max(0, s-_j + m - s+)`` over valid negatives
        (a row with no valid negative has loss 0).
    """
    hinge = (negative_scores + margin - positive_scores.unsqueeze(1)).clamp_min(0.0)
    return weighted_mean(_masked_row_mean(hinge, negative_mask), row_weights)


def bpr_loss(
    positive_scores: torch.Tensor,
    negative_scores: torch.Tensor,
    row_weights: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bayesian personalized ranking: -log sigmoid(s+ - s-), computed as softplus(s- - s+).

    Args:
        positive_scores: [B] score of each row's positive.
        negative_scores: [B, N] scores of each row's negatives.
        row_weights: [B] >= 0.
        negative_mask: [B, N] negative weights, bool or float >= 0 (False / 0 excludes; w counts
            the negative w times); None treats all as valid with weight 1.
    Returns:
        scalar: weighted mean over rows of ``mean_j log(1 + exp(s-_j - s+))`` over valid
        negatives (a row with no valid negative has loss 0).
    """
    per_pair = F.softplus(negative_scores - positive_scores.unsqueeze(1))
    return weighted_mean(_masked_row_mean(per_pair, negative_mask), row_weights)


def sampled_listwise_softmax_loss(
    positive_scores: torch.Tensor,
    negative_scores: torch.Tensor,
    temperature: float | torch.Tensor,
    row_weights: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
    positive_log_q: torch.Tensor | None = None,
    negative_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax cross entropy of each row's positive against its own sampled negatives.

    Row-specific negatives and masks cannot be expressed through
    :func:`models.losses.sampled_softmax_loss` (shared candidates, id-based masking), so the
    logits are built here and the same cross entropy and weighting are applied.

    Args:
        positive_scores: [B] score of each row's positive.
        negative_scores: [B, N] scores of each row's negatives.
        temperature: logits are score / temperature (a float or a scalar tensor []).
        row_weights: [B] >= 0.
        negative_mask: [B, N] negative weights, bool or float >= 0 (False / 0 excludes; w counts
            the negative w times, i.e. adds log w to its logit); None: all valid, weight 1.
        positive_log_q: [B] sampling-bias correction subtracted from the positive's logit
            (logQ correction, Yi et al. 2019); None: no correction.
        negative_log_q: [B, N] the same for the negatives.
    Returns:
        scalar: weighted mean over rows of ``-l+ + log(exp(l+) + sum_j w_j exp(l-_j))`` with
        ``l = s / t - log q``.
    """
    logits = torch.cat([positive_scores.unsqueeze(1), negative_scores], dim=1) / temperature
    if positive_log_q is not None or negative_log_q is not None:
        pos_q = positive_log_q if positive_log_q is not None else positive_scores.new_zeros(1)
        neg_q = negative_log_q if negative_log_q is not None else negative_scores.new_zeros(1)
        logits = logits - torch.cat(
            [pos_q.expand_as(positive_scores).unsqueeze(1), neg_q.expand_as(negative_scores)],
            dim=1,
        )
    if negative_mask is not None:
        weights = negative_mask.to(logits.dtype).detach()
        keep = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=1)
        # log 0 = -inf excludes an entry in the same pass that adds log w (one [B, 1 + N] pass
        # instead of five; this loss is a large share of a CPU step). The weights carry no
        # gradient and an excluded entry's softmax gradient is exactly 0, so no nan/inf leaks.
        logits = logits + keep.log()
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    per_row = F.cross_entropy(logits, target, reduction="none")
    return weighted_mean(per_row, row_weights)


def logged_bce_loss(
    logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """Pointwise BCE of each row's own score against its logged label.

    Args:
        logits: [B] s(u_i, i_i) / temperature.
        labels: [B] in [0, 1] (1: engaged; unengaged impressions are the negatives).
        row_weights: [B] >= 0 (0: padding).
    Returns:
        scalar: sum_i w_i * BCE_i / sum_i w_i.
    """
    per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return weighted_mean(per_row, row_weights)
