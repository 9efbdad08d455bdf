"""What one forward pass of the two-tower model returns."""

from __future__ import annotations

from typing import NamedTuple

import torch

from models.debias import DebiasEstimates


class TowerOutputs(NamedTuple):
    """What one forward pass returns.

    Args:
        user: [B, D] user (query) embeddings.
        item: [B, D] embeddings of the batch's items.
        extra_items: [E, D] embeddings of extra items (sampled / hard negatives); [0, D] if none.
        temperature: [] the softmax temperature (learned or fixed).
        ranker_user: [B, NU, D] the light ranking head's user embeddings; None without it.
        debias: [B] estimates of the debias heads (``models/debias.py``); None where a head is
            off or, for position, where no position was given.
    """

    user: torch.Tensor
    item: torch.Tensor
    extra_items: torch.Tensor
    temperature: torch.Tensor
    ranker_user: torch.Tensor | None = None
    debias: DebiasEstimates = DebiasEstimates()
