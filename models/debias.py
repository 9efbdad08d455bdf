"""Debiased example weights: take out of net user value (NUV) the part that position and the
user's general activity explain, so the retrieval softmax weights a row by what its item earned.

Each enabled part learns an estimate of its input weight given one factor, trained by MSE on its
own gradient path, and removes it from the row weight (``divide`` or ``subtract``):

- position: one learned scalar per position bucket (unknown position ``-1`` has its own bucket),
  ``E[NUV | position]``;
- user: a small MLP on the **detached** user-tower output, ``E[w | user]`` where ``w`` is the
  weight after the position part (NUV when position debiasing is off), so with both parts on the
  user head learns the activity left after position is accounted for.

Stop-gradients, both ways: the heads read ``position`` and ``user.detach()``, so their MSE never
reaches the towers or the tables; the retrieval weights use ``estimate.detach()`` and so never
teach the heads. The MSE targets are detached too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from config import DebiasConfig, DebiasMode, DebiasPartConfig


class DebiasEstimates(NamedTuple):
    """What the debias heads predict for a batch (None: part off, or position not given).

    Args:
        position: [B] estimate of NUV from the row's position bucket.
        user: [B] estimate of the (position-debiased) weight from the user embedding.
    """

    position: torch.Tensor | None = None
    user: torch.Tensor | None = None


class DebiasedWeights(NamedTuple):
    """Args:
    weights: [B] debiased row weights (detached from the heads), >= 0.
    aux_loss: [] sum of the heads' MSE losses (0 when no part is on); gradient reaches only the
        heads.
    position_mse, user_mse: [] each part's MSE, detached (0 when off), for logging.
    """

    weights: torch.Tensor
    aux_loss: torch.Tensor
    position_mse: torch.Tensor
    user_mse: torch.Tensor


def position_buckets(position: torch.Tensor, buckets: int) -> torch.Tensor:
    """position [B] int64 (``-1``: unknown) -> bucket [B] in ``[0, buckets]``: positions
    ``0 .. buckets-2`` are their own bucket, deeper ones share ``buckets - 1``, unknown is
    ``buckets``."""
    bucket = position.clamp(0, buckets - 1)
    return torch.where(position < 0, torch.full_like(position, buckets), bucket)


def remove_estimate(
    weights: torch.Tensor,
    estimate: torch.Tensor,
    mode: DebiasMode,
    min_estimate: float,
    max_weight: float,
) -> torch.Tensor:
    """weights [B] >= 0, estimate [B] -> debiased weights [B] in ``[0, max_weight]``.

    The estimate is detached: the retrieval loss never trains the estimator.
    """
    estimate = estimate.detach()
    if mode is DebiasMode.DIVIDE:
        debiased = weights / estimate.clamp_min(min_estimate)
    else:
        debiased = weights - estimate
    return debiased.clamp(0.0, max_weight)


def masked_mse(
    estimate: torch.Tensor, target: torch.Tensor, row_mask: torch.Tensor
) -> torch.Tensor:
    """sum_i m_i (estimate_i - target_i)^2 / sum_i m_i for estimate, target, row_mask [B]; the
    target is detached, padding rows (mask 0) do not teach. Returns []."""
    squared = (estimate - target.detach()).square()
    return (squared * row_mask).sum() / row_mask.sum().clamp_min(1e-12)


class PositionValueEstimate(nn.Module):
    """E[NUV | position bucket]: one learned scalar per bucket, starting at 0.

    Args:
        buckets: known-position buckets (deeper positions share the last); one more for unknown.
        learning_rate_scale: the scalars are stored divided by this factor; Adam's step does not
            depend on the gradient's scale, so the estimate moves this many times faster than the
            dense learning rate alone allows (at the dense rate, 2e-3, slot 0 needs ~500 steps to
            reach 1).
    """

    def __init__(self, buckets: int, learning_rate_scale: float = 1.0) -> None:
        super().__init__()
        self.buckets = buckets
        self.learning_rate_scale = learning_rate_scale
        self.value = nn.Embedding(buckets + 1, 1)
        nn.init.zeros_(self.value.weight)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        """position [B] int64 -> estimate [B]."""
        stored = self.value(position_buckets(position, self.buckets)).squeeze(1)
        return stored * self.learning_rate_scale


class UserValueEstimate(nn.Module):
    """E[w | user]: an MLP on the user embedding, which it reads detached (no gradient into the
    user tower or the tables).

    Args:
        user_dim: D of the user embedding.
        hidden_dim: width of the hidden layer.
    """

    def __init__(self, user_dim: int, hidden_dim: int) -> None:
        super().__init__()
        output = nn.Linear(hidden_dim, 1)
        # Start at 0 like the position estimate; the clamp keeps divide mode finite meanwhile.
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        self.mlp = nn.Sequential(nn.Linear(user_dim, hidden_dim), nn.ReLU(), output)

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        """user [B, D] -> estimate [B]."""
        return self.mlp(user.detach()).squeeze(1)


class ExampleDebias(nn.Module):
    """The enabled heads, composed (either may be None).

    Args:
        position: position head or None.
        user: user head or None.
    """

    def __init__(
        self, position: PositionValueEstimate | None, user: UserValueEstimate | None
    ) -> None:
        super().__init__()
        self.position = position
        self.user = user

    def forward(self, user: torch.Tensor, position: torch.Tensor | None) -> DebiasEstimates:
        """user [B, D], position [B] int64 or None -> estimates ([B] each, or None)."""
        return DebiasEstimates(
            position=None if self.position is None or position is None else self.position(position),
            user=None if self.user is None else self.user(user),
        )


def build_example_debias(config: DebiasConfig, user_dim: int) -> ExampleDebias | None:
    """The heads ``config`` switches on; None when both are off (no parameters added)."""
    if not (config.position.enabled or config.user.enabled):
        return None
    position = None
    if config.position.enabled:
        position = PositionValueEstimate(
            config.position.buckets, config.position.learning_rate_scale
        )
    user = UserValueEstimate(user_dim, config.user.hidden_dim) if config.user.enabled else None
    return ExampleDebias(position, user)


def debiased_weights(
    net_user_value: torch.Tensor,
    estimates: DebiasEstimates,
    config: DebiasConfig,
    row_mask: torch.Tensor,
) -> DebiasedWeights:
    """Row weights with position, then user, effects removed, and the heads' MSE losses.

    Args:
        net_user_value: [B] >= 0.
        estimates: the heads' outputs for this batch (a part whose estimate is None is skipped).
        config: the debias configuration (modes and clamps).
        row_mask: [B] row weights of the batch (0: padding, never a target).
    Returns:
        weights [B] (NUV itself when no estimate is given) and ``aux_loss`` [].
    """
    weights = net_user_value
    zero = net_user_value.new_zeros(())
    position_mse, user_mse = zero, zero
    if estimates.position is not None:
        position_mse = masked_mse(estimates.position, weights, row_mask)
        weights = _remove(weights, estimates.position, config.position)
    if estimates.user is not None:
        user_mse = masked_mse(estimates.user, weights, row_mask)
        weights = _remove(weights, estimates.user, config.user)
    return DebiasedWeights(
        weights.detach(), position_mse + user_mse, position_mse.detach(), user_mse.detach()
    )


def _remove(weights: torch.Tensor, estimate: torch.Tensor, part: DebiasPartConfig) -> torch.Tensor:
    return remove_estimate(weights, estimate, part.mode, part.min_estimate, part.max_weight)
