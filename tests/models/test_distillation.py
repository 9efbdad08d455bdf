"""Distillation losses against simple per-row reference implementations, their masks and
gradients, and a tiny world where the listwise term pulls a student's ranking to the teacher's."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.distillation import (
    first_occurrence_mask,
    listwise_distillation_loss,
    pointwise_distillation_loss,
    teacher_log_values,
)


def _reference_pointwise(logits, scores, weights) -> float:
    total, norm = 0.0, 0.0
    for s, r, w in zip(logits.tolist(), scores.tolist(), weights.tolist()):
        if math.isnan(r):
            continue
        p, q = 1 / (1 + math.exp(-r)), 1 / (1 + math.exp(-s))
        total += w * -(p * math.log(q) + (1 - p) * math.log(1 - q))
        norm += w
    return total / norm if norm else 0.0


def test_pointwise_matches_reference_and_skips_unknown_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=generator, dtype=torch.float64)
    scores = torch.randn(12, generator=generator, dtype=torch.float64) * 3
    scores[[1, 5]] = float("nan")
    weights = torch.rand(12, generator=generator, dtype=torch.float64)
    weights[3] = 0.0
    loss = pointwise_distillation_loss(logits, scores, weights)
    assert float(loss) == pytest.approx(_reference_pointwise(logits, scores, weights))
    logits.requires_grad_(True)
    pointwise_distillation_loss(logits, scores, weights).backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[[1, 3, 5]] == 0)  # unknown score or padding row: no signal


def test_pointwise_without_any_score_is_zero_with_a_graph() -> None:
    logits = torch.randn(4, requires_grad=True)
    loss = pointwise_distillation_loss(logits, torch.full((4,), float("nan")), torch.ones(4))
    assert float(loss) == 0.0 and loss.requires_grad


def _reference_mask(ids: list[list[int]], valid: list[list[bool]]) -> list[list[bool]]:
    out = []
    for row_ids, row_valid in zip(ids, valid):
        seen: set[int] = set()
        row = []
        for item, ok in zip(row_ids, row_valid):
            keep = ok and item >= 0 and item not in seen
            if keep:
                seen.add(item)
            row.append(keep)
        out.append(row)
    return out


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda rows: st.integers(1, 8).flatmap(
            lambda cols: st.tuples(
                st.lists(
                    st.lists(st.integers(-1, 4), min_size=cols, max_size=cols),
                    min_size=rows,
                    max_size=rows,
                ),
                st.lists(
                    st.lists(st.booleans(), min_size=cols, max_size=cols),
                    min_size=rows,
                    max_size=rows,
                ),
            )
        )
    )
)
def test_first_occurrence_mask_matches_reference(case) -> None:
    ids, valid = case
    mask = first_occurrence_mask(torch.tensor(ids), torch.tensor(valid))
    assert mask.tolist() == _reference_mask(ids, valid)


def _reference_listwise(student, teacher, mask, weights, t_teacher, t_student) -> float:
    total, norm = 0.0, 0.0
    for b in range(student.shape[0]):
        columns = [c for c in range(student.shape[1]) if mask[b, c]]
        if len(columns) < 2:
            continue
        t = [float(teacher[b, c]) / t_teacher for c in columns]
        s = [float(student[b, c]) / t_student for c in columns]
        zt, zs = sum(math.exp(x) for x in t), sum(math.exp(x) for x in s)
        p = [math.exp(x) / zt for x in t]
        q = [math.exp(x) / zs for x in s]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        total += float(weights[b]) * kl
        norm += float(weights[b])
    return total / norm if norm else 0.0


def test_listwise_matches_reference() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    teacher = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 2
    mask = torch.rand(6, 9, generator=generator) < 0.7
    mask[2] = False
    mask[3, 1:] = False  # one candidate: no distribution to match
    weights = torch.rand(6, generator=generator, dtype=torch.float64)
    loss = listwise_distillation_loss(student, teacher, mask, weights, 2.0, 0.5)
    expected = _reference_listwise(student, teacher, mask, weights, 2.0, 0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_listwise_is_zero_when_student_equals_teacher() -> None:
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(5, 7, generator=generator)
    mask = torch.rand(5, 7, generator=generator) < 0.8
    # Same distribution: student scores / 0.1 == teacher logits / 2.
    student = teacher * 0.1 / 2.0
    loss = listwise_distillation_loss(student, teacher, mask, torch.ones(5), 2.0, 0.1)
    assert abs(float(loss)) < 1e-6
    shifted = student + torch.randn(5, 1, generator=generator)  # per-row shifts change nothing
    assert (
        abs(float(listwise_distillation_loss(shifted, teacher, mask, torch.ones(5), 2.0, 0.1)))
        < 1e-5
    )


def test_listwise_gradient_reaches_only_the_student_and_unmasked_columns() -> None:
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 6, generator=generator, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    loss = listwise_distillation_loss(student, teacher, mask, torch.ones(4), 1.0, 0.5)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert torch.all(student.grad[:, 4:] == 0) and torch.any(student.grad[:, :4] != 0)


def test_teacher_log_values_follow_the_value_and_floor_zero() -> None:
    values = torch.tensor([[0.5, 0.25, 0.0]])
    logits = teacher_log_values(values)
    assert torch.isfinite(logits).all()
    probabilities = logits.softmax(dim=1)
    assert float(probabilities[0, 0] / probabilities[0, 1]) == pytest.approx(2.0)


def _kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of Kendall's tau between two [B, C] score matrices."""
    da = torch.sign(a.unsqueeze(2) - a.unsqueeze(1))
    db = torch.sign(b.unsqueeze(2) - b.unsqueeze(1))
    pairs = a.shape[1] * (a.shape[1] - 1)
    return float(((da * db).sum(dim=(1, 2)) / pairs).mean())


def test_listwise_moves_the_students_ranking_toward_the_teachers() -> None:
    """Tiny world: 8 users, 20 items, free unit-norm embeddings; the teacher prefers items by a
    hidden user x item score. Distillation alone raises rank agreement with the teacher."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(8, 20, generator=generator) * 2
    user = torch.nn.Parameter(torch.randn(8, 16, generator=generator))
    item = torch.nn.Parameter(torch.randn(20, 16, generator=generator))
    optimizer = torch.optim.Adam([user, item], lr=0.05)
    mask = torch.ones(8, 20, dtype=torch.bool)

    def scores() -> torch.Tensor:
        u = torch.nn.functional.normalize(user, dim=1)
        v = torch.nn.functional.normalize(item, dim=1)
        return u @ v.T

    before = _kendall_tau(scores().detach(), hidden)
    for _ in range(200):
        optimizer.zero_grad()
        listwise_distillation_loss(scores(), hidden, mask, torch.ones(8), 1.0, 0.1).backward()
        optimizer.step()
    after = _kendall_tau(scores().detach(), hidden)
    assert before < 0.2 and after > 0.7, (before, after)
