"""The softmax temperature: a constant, or a learned scalar clamped to a range."""

from __future__ import annotations

import math

import torch
from torch import nn


class Temperature(nn.Module):
    """Args:
    initial: starting (or fixed) temperature t > 0.
    learn: learn log t with the dense optimizer; otherwise t stays a buffer.
    low, high: clamp of a learned temperature (the gradient stops at the bounds).
    """

    def __init__(self, initial: float, learn: bool, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high
        log_t = torch.tensor(math.log(initial))
        if learn:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def forward(self) -> torch.Tensor:
        """Returns the temperature, a scalar tensor []."""
        return self.log_temperature.exp().clamp(self.low, self.high)
