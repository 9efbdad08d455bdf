"""The dense learning-rate schedule against its closed form, and its config checks."""

from __future__ import annotations

import math

import pytest
import torch

from config import ConfigError, LRDecay, LRScheduleConfig, load_config
from trainer.runtime.lr_schedule import DenseLRSchedule, lr_factor


def _reference(kind: str, step: int, warmup: int, end: int, floor: float) -> float:
    """The schedule written out step by step, the way a reader would check it by hand."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    t = min(step - warmup, end - warmup) / (end - warmup)
    shape = 1 - t if kind == "linear" else (1 + math.cos(math.pi * t)) / 2
    return floor + (1 - floor) * shape


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "floor"), [(0, 0.0), (5, 0.0), (3, 0.1)])
def test_factor_matches_the_closed_form_at_every_step(kind: str, warmup: int, floor: float) -> None:
    schedule = LRScheduleConfig(warmup_steps=warmup, decay=LRDecay(kind), min_ratio=floor)
    factors = [lr_factor(schedule, step, 20) for step in range(30)]
    assert factors == pytest.approx([_reference(kind, s, warmup, 20, floor) for s in range(30)])
    if warmup:
        assert factors[warmup - 1] == 1.0  # warm-up ends at the full rate
    if kind != "constant":
        assert factors[20:] == pytest.approx([floor] * 10)  # held at the floor after the horizon
        assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))


def test_decay_steps_overrides_the_job_horizon() -> None:
    schedule = LRScheduleConfig(decay=LRDecay.LINEAR, decay_steps=10)
    assert lr_factor(schedule, 5, horizon=1000) == pytest.approx(0.5)


def test_schedule_sets_every_param_group() -> None:
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([{"params": [first]}, {"params": [second]}], lr=0.5)
    schedule = DenseLRSchedule(optimizer, 0.5, LRScheduleConfig(warmup_steps=4), None)
    assert schedule.apply(1) == pytest.approx(0.25)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.25, 0.25])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.lr_schedule.decay=cosine"], "train.lr_schedule.decay_steps"),
        (
            [
                "train.lr_schedule.decay=linear",
                "train.max_steps=4",
                "train.lr_schedule.warmup_steps=4",
            ],
            "train.lr_schedule.decay_steps",
        ),
        (["train.lr_schedule.min_ratio=1.5"], "train.lr_schedule.min_ratio"),
        (["train.lr_schedule.warmup_steps=-1"], "train.lr_schedule.warmup_steps"),
        (["train.lr_schedule.decay=step"], "train.lr_schedule.decay"),
    ],
)
def test_bad_schedules_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)
