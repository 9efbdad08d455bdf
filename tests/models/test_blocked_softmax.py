"""The linear-memory shared-candidate softmax equals the materialized one, value and gradients."""

from __future__ import annotations

import pytest
import torch

from models.blocked_softmax import hit_pairs, shared_softmax_loss
from models.loss_families import sampled_listwise_softmax_loss


def _dense_loss(user, item, ids, log_q, weights, temperature, mask_hits):
    """Today's layout: [B, C] scores, 0/1 weights, the positive's column excluded."""
    negatives = user @ item.T
    keep = (ids >= 0).to(user.dtype).expand_as(negatives).clone()
    if mask_hits:
        keep = keep * (ids.unsqueeze(0) != ids.unsqueeze(1))
    rows = torch.arange(user.shape[0])
    keep[rows, rows] = 0.0
    return sampled_listwise_softmax_loss(
        (user * item).sum(1), negatives, temperature, weights, keep, log_q, log_q.expand_as(keep)
    )


def _inputs(seed: int, rows: int = 37, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    item = torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 9, (rows,), generator=g)  # many duplicates
    ids[[3, rows // 3, rows - 5]] = -1  # padding rows
    log_q = torch.randn(rows, generator=g, dtype=torch.float64).where(ids >= 0, 0.0)
    weights = torch.rand(rows, generator=g, dtype=torch.float64) * (ids >= 0)
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    return user, item, ids, log_q, weights, temperature


@pytest.mark.parametrize("mask_hits", [True, False])
@pytest.mark.parametrize("block_rows", [1, 5, 64])
def test_equals_materialized_softmax(mask_hits: bool, block_rows: int) -> None:
    user, item, ids, log_q, weights, temperature = _inputs(0)
    expected = _dense_loss(user, item, ids, log_q, weights, temperature, mask_hits)
    want = torch.autograd.grad(expected, (user, item, temperature))
    got_loss = shared_softmax_loss(
        user, item, ids, log_q, torch.arange(37), ids, temperature, weights, mask_hits, block_rows
    )
    got = torch.autograd.grad(got_loss, (user, item, temperature))
    torch.testing.assert_close(got_loss, expected)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gradcheck() -> None:
    user, item, ids, log_q, weights, temperature = _inputs(1, rows=9, dim=3)

    def loss(u, i, t):
        return shared_softmax_loss(u, i, ids, log_q, torch.arange(9), ids, t, weights, True, 4)

    assert torch.autograd.gradcheck(loss, (user, item, temperature))


def test_hit_pairs_match_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(-1, 6, (50,), generator=g)
    candidates = torch.randint(-1, 6, (70,), generator=g)
    r, c = hit_pairs(rows, candidates)
    got = set(zip(r.tolist(), c.tolist()))
    brute = (rows.unsqueeze(1) == candidates.unsqueeze(0)) & (rows >= 0).unsqueeze(1)
    assert got == set(map(tuple, brute.nonzero().tolist()))
    assert len(got) == r.numel()


def test_value_without_gradients_equals_training_value() -> None:
    user, item, ids, log_q, weights, temperature = _inputs(3)
    args = (ids, log_q, torch.arange(37), ids, temperature, weights, True, 7)
    trained = shared_softmax_loss(user, item, *args)
    with torch.no_grad():
        evaluated = shared_softmax_loss(user, item, *args)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, trained.detach())


def test_rows_without_weight_or_negatives_contribute_nothing() -> None:
    """Every weight 0: loss 0 and zero gradients. A row whose only candidates are its own
    positive and its hits has no negatives: it adds nothing, and nothing is NaN."""
    user, item, ids, log_q, weights, temperature = _inputs(4, rows=6, dim=4)
    ids = torch.tensor([5, 5, 5, -1, 5, 5])
    zero = shared_softmax_loss(
        user, item, ids, log_q, torch.arange(6), ids, temperature, weights * 0, True, 2
    )
    grads = torch.autograd.grad(zero, (user, item))
    assert zero.item() == 0.0 and all((g == 0).all() for g in grads)
    real_rows = (ids >= 0).double()  # the padding row has weight 0, as in a batch
    loss = shared_softmax_loss(
        user, item, ids, log_q, torch.arange(6), ids, temperature, real_rows, True, 4
    )
    grads = torch.autograd.grad(loss, (user, item, temperature))
    assert loss.item() == 0.0 and all(torch.isfinite(g).all() for g in grads)


def test_gradient_scales_with_the_incoming_gradient() -> None:
    user, item, ids, log_q, weights, temperature = _inputs(5)
    args = (ids, log_q, torch.arange(37), ids, temperature, weights, True, 16)
    once = torch.autograd.grad(shared_softmax_loss(user, item, *args), (user, item))
    thrice = torch.autograd.grad(3.0 * shared_softmax_loss(user, item, *args), (user, item))
    for a, b in zip(once, thrice):
        torch.testing.assert_close(3.0 * a, b)
