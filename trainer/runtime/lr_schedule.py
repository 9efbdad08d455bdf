"""The dense optimizer's learning rate as a pure function of the global step.

``factor(step)`` multiplies the base rate (the job's ``dense_lr``: ``train``, ``ranker.train``,
``alignment.train``):
``(step + 1) / warmup_steps`` during warm-up, then 1 (constant), or a linear or half-cosine
fall to ``min_ratio`` at the decay horizon, held after it. Nothing but the step is needed, so a
resumed run (whose step is checkpointed) continues the schedule exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Any

from config import LRDecay, LRScheduleConfig


def lr_factor(schedule: LRScheduleConfig, step: int, horizon: int | None) -> float:
    """The multiplier of the base rate for the update made at ``step`` (0-based).

    Args:
        horizon: the step at which the decay reaches ``min_ratio`` (``decay_steps`` or the
            job's step limit); unused for a constant schedule.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule.decay is LRDecay.CONSTANT:
        return 1.0
    end = schedule.decay_steps if schedule.decay_steps is not None else horizon
    assert end is not None and end > warmup  # validated with the config
    progress = min(1.0, (step - warmup) / (end - warmup))
    if schedule.decay is LRDecay.LINEAR:
        remaining = 1.0 - progress
    else:
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_ratio + (1.0 - schedule.min_ratio) * remaining


class DenseLRSchedule:
    """Sets every parameter group's rate of ``optimizer`` before the update at each step.

    Args:
        optimizer: the dense (data-parallel) optimizer; anything with ``param_groups``.
        base_lr: the rate the schedule scales.
        horizon: the job's step limit (its section's ``max_steps``), the decay's
            end when ``decay_steps`` is null.
    """

    def __init__(
        self, optimizer: Any, base_lr: float, schedule: LRScheduleConfig, horizon: int | None
    ) -> None:
        self.optimizer, self.base_lr = optimizer, base_lr
        self.schedule, self.horizon = schedule, horizon

    def apply(self, step: int) -> float:
        """Sets and returns the rate of the update at ``step``."""
        lr = self.base_lr * lr_factor(self.schedule, step, self.horizon)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
