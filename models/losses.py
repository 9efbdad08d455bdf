"""Retrieval losses as pure functions of embeddings, ids and weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def net_user_value(labels: torch.Tensor, label_weights: torch.Tensor) -> torch.Tensor:
    """labels [B, T] . label_weights [T], clamped at 0. Returns [B]."""
    return (labels * label_weights).sum(dim=1).clamp_min(0.0)


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
        item_ids: [B] ids; another row with the same id as row i's positive is not a negative.
        row_weights: [B] >= 0, e.g. net user value; normalized to sum 1 within the batch.
        temperature: logits are u.v / temperature.
    Returns:
        scalar: sum_i w_i * CE_i / sum_i w_i (0 with a gradient graph when all weights are 0).
    """
    logits = user @ item.T / temperature
    if mask_accidental_hits:
        same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    targets = torch.arange(user.shape[0], device=user.device)
    per_row = F.cross_entropy(logits, targets, reduction="none")
    total = row_weights.sum()
    return (per_row * row_weights).sum() / total.clamp_min(1e-12)
