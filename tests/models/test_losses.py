"""In-batch softmax and net user value against hand-computed values."""

from __future__ import annotations

import math

import torch

from models.losses import in_batch_softmax_loss, net_user_value


def test_net_user_value_weights_and_clamps() -> None:
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    value = net_user_value(labels, torch.tensor([1.0, -2.0]))
    assert value.tolist() == [1.0, 0.0, 0.0]


def test_in_batch_softmax_matches_hand_computation() -> None:
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    item = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = in_batch_softmax_loss(user, item, torch.tensor([0, 1]), torch.ones(2), 1.0)
    # Row 0: logits [1, 1] -> log 2. Row 1: logits [0, 0] -> log 2.
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)


def test_accidental_hits_are_not_negatives() -> None:
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    item = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    ids = torch.tensor([7, 3, 7])  # rows 0 and 2 share an item
    masked = in_batch_softmax_loss(user, item, ids, torch.ones(3), 1.0, mask_accidental_hits=True)
    logits = user @ item.T
    expected = []
    for row in range(3):
        keep = [c for c in range(3) if c == row or ids[c] != ids[row]]
        expected.append(-logits[row, row] + torch.logsumexp(logits[row, keep], 0))
    assert torch.allclose(masked, torch.stack(expected).mean())
    plain = in_batch_softmax_loss(user, item, ids, torch.ones(3), 1.0, mask_accidental_hits=False)
    assert not torch.allclose(masked, plain)


def test_row_weights_normalize_and_zero_value_rows_give_no_signal() -> None:
    torch.manual_seed(0)
    user = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    item = torch.nn.functional.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    ids = torch.arange(4)
    weights = torch.tensor([2.0, 0.0, 1.0, 1.0])
    loss = in_batch_softmax_loss(user, item, ids, weights, 0.1)
    per_row = torch.nn.functional.cross_entropy(user @ item.T / 0.1, ids, reduction="none")
    assert torch.allclose(loss, (per_row * weights).sum() / 4)
    zero = in_batch_softmax_loss(user, item, ids, torch.zeros(4), 0.1)
    zero.backward()
    assert float(zero) == 0.0 and torch.count_nonzero(item.grad) == 0


def test_temperature_scales_logits() -> None:
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    item = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hot = in_batch_softmax_loss(user, item, torch.arange(2), torch.ones(2), 1.0)
    cold = in_batch_softmax_loss(user, item, torch.arange(2), torch.ones(2), 0.1)
    assert math.isclose(float(hot), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert math.isclose(float(cold), math.log(1 + math.exp(-10)), rel_tol=1e-2)
