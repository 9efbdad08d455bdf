"""Pointwise, pairwise and listwise losses against hand-computed values, masks and gradcheck."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from models.loss_families import (
    bpr_loss,
    cosine_regression_loss,
    sampled_listwise_softmax_loss,
    sigmoid_cross_entropy_loss,
    triplet_hinge_loss,
)

# Each adapter maps (positive [B], negatives [B, N], row_weights [B], mask [B, N] | None) to a loss.
Adapter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _sigmoid(pos: torch.Tensor, neg: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None):
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    full_mask = None
    if mask is not None:
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    return sigmoid_cross_entropy_loss(logits, labels, w, full_mask)


def _cosine(pos: torch.Tensor, neg: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None):
    del mask  # no mask: the ratio picks the leading negatives instead
    return cosine_regression_loss(torch.cat([pos.unsqueeze(1), neg], dim=1), w, neg.shape[1] - 1)


def _triplet(pos: torch.Tensor, neg: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None):
    return triplet_hinge_loss(pos, neg, 0.3, w, mask)


def _bpr(pos: torch.Tensor, neg: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None):
    return bpr_loss(pos, neg, w, mask)


def _listwise(pos: torch.Tensor, neg: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None):
    return sampled_listwise_softmax_loss(pos, neg, 0.7, w, mask)


ALL: dict[str, Adapter] = {
    "sigmoid": _sigmoid,
    "cosine": _cosine,
    "triplet": _triplet,
    "bpr": _bpr,
    "listwise": _listwise,
}
MASKED = {name: fn for name, fn in ALL.items() if name != "cosine"}


def _close(actual: torch.Tensor, expected: float) -> None:
    assert math.isclose(float(actual), expected, rel_tol=1e-6, abs_tol=1e-9), (
        float(actual),
        expected,
    )


def test_sigmoid_cross_entropy_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss = sigmoid_cross_entropy_loss(logits, labels, torch.tensor([1.0, 3.0]), mask)
    # BCE(x, 1) = log(1 + e^-x), BCE(x, 0) = log(1 + e^x); row 1's second entry is masked.
    row0 = (math.log(2.0) + math.log(1.0 + math.exp(2.0))) / 2.0
    row1 = math.log(1.0 + math.exp(-1.0))
    _close(loss, (1.0 * row0 + 3.0 * row1) / 4.0)
    unmasked = sigmoid_cross_entropy_loss(logits, labels, torch.tensor([1.0, 3.0]))
    row1_full = (math.log(1.0 + math.exp(-1.0)) + math.log(1.0 + math.exp(-3.0))) / 2.0
    _close(unmasked, (row0 + 3.0 * row1_full) / 4.0)


def test_cosine_regression_uses_first_k_negatives() -> None:
    scores = torch.tensor([[0.5, -0.5, 0.0, 0.9], [0.1, 0.2, 0.3, 0.4]])
    weights = torch.tensor([1.0, 0.0])
    # 1:2 -> ((0.5-1)^2 + (-0.5+1)^2 + (0+1)^2) / 3; 1:1 -> (0.25 + 0.25) / 2.
    _close(cosine_regression_loss(scores, weights, 2), (0.25 + 0.25 + 1.0) / 3.0)
    _close(cosine_regression_loss(scores, weights, 1), 0.25)
    _close(cosine_regression_loss(scores, weights, 3), (0.25 + 0.25 + 1.0 + 1.9**2) / 4.0)


def test_cosine_regression_rejects_too_few_negatives() -> None:
    with pytest.raises(ValueError, match="negatives_per_positive=4"):
        cosine_regression_loss(torch.zeros(2, 4), torch.ones(2), 4)
    with pytest.raises(ValueError, match="negatives_per_positive=-1"):
        cosine_regression_loss(torch.zeros(2, 4), torch.ones(2), -1)


def test_triplet_hinge_matches_hand_computation() -> None:
    pos = torch.tensor([1.0, 0.0])
    neg = torch.tensor([[0.5, 2.0, -1.0], [0.2, -3.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = triplet_hinge_loss(pos, neg, 1.0, torch.ones(2), mask)
    # Row 0: max(0, .5) + max(0, 2) + max(0, -1) over 3; row 1: max(0, 1.2) + max(0, -2) over 2.
    _close(loss, (2.5 / 3.0 + 1.2 / 2.0) / 2.0)


def test_bpr_matches_hand_computation_and_is_stable() -> None:
    loss = bpr_loss(torch.tensor([1.0]), torch.tensor([[1.0, 3.0]]), torch.ones(1))
    _close(loss, (math.log(2.0) + math.log(1.0 + math.exp(2.0))) / 2.0)
    huge = bpr_loss(torch.tensor([0.0]), torch.tensor([[1000.0, -1000.0]]), torch.ones(1))
    # softplus(1000) = 1000 (+ e^-1000), softplus(-1000) = e^-1000 ~ 0.
    _close(huge, 500.0)


def test_listwise_softmax_matches_hand_computation() -> None:
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.0, 2.0]])
    # Logits / 0.5 = [2, 0, 4]; the positive is column 0.
    loss = sampled_listwise_softmax_loss(pos, neg, 0.5, torch.ones(1))
    _close(loss, -2.0 + math.log(math.exp(2.0) + 1.0 + math.exp(4.0)))
    masked = sampled_listwise_softmax_loss(pos, neg, 0.5, torch.ones(1), torch.tensor([[1, 0]]) > 0)
    _close(masked, -2.0 + math.log(math.exp(2.0) + 1.0))


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_weight_rows_contribute_nothing(name: str) -> None:
    fn = ALL[name]
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(3, generator=gen), torch.rand(3, 4, generator=gen)
    weights = torch.tensor([2.0, 0.0, 1.0])
    base = fn(pos, neg, weights, None)
    pos2, neg2 = pos.clone(), neg.clone()
    pos2[1], neg2[1] = -5.0, 7.0
    assert torch.allclose(fn(pos2, neg2, weights, None), base)
    kept = torch.tensor([0, 2])
    assert torch.allclose(fn(pos[kept], neg[kept], weights[kept], None), base)


@pytest.mark.parametrize("name", sorted(ALL))
def test_all_zero_weights_give_zero_with_graph(name: str) -> None:
    pos = torch.rand(2, requires_grad=True)
    neg = torch.rand(2, 3, requires_grad=True)
    loss = ALL[name](pos, neg, torch.zeros(2), None)
    assert float(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert pos.grad is not None and torch.count_nonzero(pos.grad) == 0


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_negatives_change_nothing(name: str) -> None:
    fn = MASKED[name]
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.rand(2, generator=gen), torch.rand(2, 4, generator=gen)
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    weights = torch.tensor([1.0, 2.0])
    base = fn(pos, neg, weights, mask)
    moved = neg.masked_fill(~mask, 50.0).requires_grad_(True)
    loss = fn(pos, moved, weights, mask)
    assert torch.allclose(loss, base)
    loss.backward()
    assert moved.grad is not None and torch.count_nonzero(moved.grad[~mask]) == 0
    # The same as dropping the masked columns (each row keeps two negatives here).
    dense = neg[mask].view(2, 2)
    assert torch.allclose(fn(pos, dense, weights, None), base)


@pytest.mark.parametrize("name", sorted(ALL))
def test_gradcheck_float64(name: str) -> None:
    fn = ALL[name]
    gen = torch.Generator().manual_seed(2)
    pos = torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    neg = (torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    weights = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.1).requires_grad_(True)
    mask = (
        None if name == "cosine" else torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]]) > 0
    )
    assert torch.autograd.gradcheck(lambda p, n, w: fn(p, n, w, mask), (pos, neg, weights))


def test_listwise_softmax_excluded_negatives_get_zero_finite_gradient() -> None:
    scores = torch.tensor([[3.0, -2.0, 50.0], [0.5, 40.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    loss = sampled_listwise_softmax_loss(
        torch.tensor([1.0, 0.0]), scores, 0.05, torch.ones(2), negative_mask=mask
    )
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert (scores.grad[mask == 0] == 0).all() and (scores.grad[mask > 0] != 0).all()
