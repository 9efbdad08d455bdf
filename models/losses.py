"""Retrieval losses as pure functions of embeddings, ids and weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def net_user_value(labels: torch.Tensor, label_weights: torch.Tensor) -> torch.Tensor:
    """labels [B, T] . label_weights [T], clamped at 0. Returns [B]."""
    return (labels * label_weights).sum(dim=1).clamp_min(0.0)


def weighted_mean(per_row: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """sum(w * l) / sum(w) for per_row [B] and row_weights [B] >= 0; 0 (still attached to the
    graph) when all weights are 0."""
    return (per_row * row_weights).sum() / row_weights.sum().clamp_min(1e-12)


def sampled_softmax_loss(
    user: torch.Tensor,
    candidates: torch.Tensor,
    candidate_ids: torch.Tensor,
    positive_index: torch.Tensor,
    row_weights: torch.Tensor,
    temperature: float,
    mask_accidental_hits: bool = True,
) -> torch.Tensor:
    """Softmax of each row's positive against a shared candidate set.

    Args:
        user: [B, D] query embeddings.
        candidates: [C, D] item embeddings; row i's positive is ``candidates[positive_index[i]]``.
        candidate_ids: [C] item ids; -1 marks padding (never a negative). With
            ``mask_accidental_hits``, a candidate with the same id as row i's positive is not
            one of row i's negatives.
        positive_index: [B] int64 column of each row's positive.
        row_weights: [B] >= 0, e.g. net user value; normalized to sum 1 within the batch.
        temperature: logits are u.v / temperature.
    Returns:
        scalar: sum_i w_i * CE_i / sum_i w_i (0 with a gradient graph when all weights are 0).
    """
    logits = user @ candidates.T / temperature
    positive_ids = candidate_ids[positive_index]
    masked = (candidate_ids < 0).unsqueeze(0).expand_as(logits)
    if mask_accidental_hits:
        masked = masked | (candidate_ids.unsqueeze(0) == positive_ids.unsqueeze(1))
    rows = torch.arange(user.shape[0], device=user.device)
    masked = masked.clone()
    masked[rows, positive_index] = False
    logits = logits.masked_fill(masked, float("-inf"))
    per_row = F.cross_entropy(logits, positive_index, reduction="none")
    return weighted_mean(per_row, row_weights)


def in_batch_softmax_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    row_weights: torch.Tensor,
    temperature: float,
    mask_accidental_hits: bool = True,
) -> torch.Tensor:
    """Sampled softmax where row i's negatives are the other rows' items.

    Args:
        user: [B, D] query embeddings.
        item: [B, D] positive item embeddings (row i's positive is item[i]).
        item_ids: [B] ids of those items.
        row_weights: [B] >= 0.
        temperature: logits are u.v / temperature.
    Returns:
        scalar, as :func:`sampled_softmax_loss` with the batch's items as candidates.
    """
    positive_index = torch.arange(user.shape[0], device=user.device)
    return sampled_softmax_loss(
        user, item, item_ids, positive_index, row_weights, temperature, mask_accidental_hits
    )
