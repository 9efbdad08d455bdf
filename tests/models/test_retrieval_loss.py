"""The loss-family dispatcher over the row-wise candidate layout: equivalences, logQ, weights."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from config import LossConfig, LossFamily
from models.loss_families import sampled_listwise_softmax_loss
from models.losses import sampled_softmax_loss
from models.retrieval_loss import (
    LOSSES,
    ScoredCandidates,
    retrieval_loss,
    sample_negative_columns,
)


def _in_batch_layout(user: torch.Tensor, item: torch.Tensor, ids: torch.Tensor) -> ScoredCandidates:
    """The in-batch candidate matrix as the trainer lays it out (positive column excluded)."""
    scores = user @ item.T
    weights = (ids.unsqueeze(0) != ids.unsqueeze(1)).to(scores.dtype)
    rows = user.shape[0]
    return ScoredCandidates(
        positive=scores.diagonal(),
        negatives=scores,
        weights=weights,
        positive_log_q=torch.zeros(rows),
        negative_log_q=torch.zeros(rows, rows),
    )


def test_softmax_family_equals_in_batch_softmax_with_hit_masking() -> None:
    torch.manual_seed(0)
    user, item = torch.randn(6, 4), torch.randn(6, 4)
    ids = torch.tensor([3, 1, 3, 2, 5, 1])  # accidental hits: rows 0/2 and 1/5
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 1.0])
    expected = sampled_softmax_loss(user, item, ids, torch.arange(6), weights, 0.2, True)
    got = retrieval_loss(
        _in_batch_layout(user, item, ids), torch.tensor(0.2), weights, LossConfig()
    )
    torch.testing.assert_close(got, expected)


def test_log_q_correction_hand_computed() -> None:
    """l = s/t - log q; CE = -l+ + log(exp(l+) + sum_j exp(l_j))."""
    positive, negatives = torch.tensor([0.5]), torch.tensor([[0.2, -0.1]])
    pos_q, neg_q = torch.tensor([math.log(0.5)]), torch.tensor([[math.log(0.1), math.log(0.8)]])
    loss = sampled_listwise_softmax_loss(
        positive, negatives, 0.5, torch.ones(1), None, pos_q, neg_q
    )
    logits = [1.0 - math.log(0.5), 0.4 - math.log(0.1), -0.2 - math.log(0.8)]
    expected = -logits[0] + math.log(sum(math.exp(x) for x in logits))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_negative_weight_counts_as_duplicates() -> None:
    positive, negatives = torch.tensor([0.3, 0.1]), torch.tensor([[0.2, 0.5], [0.4, -0.3]])
    weighted = sampled_listwise_softmax_loss(
        positive, negatives, 0.1, torch.ones(2), torch.tensor([[2.0, 1.0], [3.0, 0.0]])
    )
    duplicated = sampled_listwise_softmax_loss(
        positive,
        torch.tensor([[0.2, 0.2, 0.5], [0.4, 0.4, 0.4]]),
        0.1,
        torch.ones(2),
        torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
    )
    torch.testing.assert_close(weighted, duplicated)


def test_log_q_softmax_gradcheck() -> None:
    torch.manual_seed(1)
    positive = torch.randn(3, dtype=torch.float64, requires_grad=True)
    negatives = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([[1.0, 0.0, 2.0, 1.0]] * 3, dtype=torch.float64)
    pos_q = torch.randn(3, dtype=torch.float64)
    neg_q = torch.randn(3, 4, dtype=torch.float64)

    def fn(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return sampled_listwise_softmax_loss(
            p, n, 0.3, torch.ones(3, dtype=torch.float64), weights, pos_q, neg_q
        )

    assert torch.autograd.gradcheck(fn, (positive, negatives))


def test_sampled_columns_are_valid_distinct_and_reproducible() -> None:
    weights = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    index, valid = sample_negative_columns(weights, 3, torch.Generator().manual_seed(0))
    assert index.shape == (2, 3)
    assert sorted(index[0].tolist()) == [0, 2, 3] and valid[0].all()
    assert index[1, 0] == 2 and valid[1].tolist() == [True, False, False]
    again, _ = sample_negative_columns(weights, 3, torch.Generator().manual_seed(0))
    assert torch.equal(index, again)


@pytest.mark.parametrize("family", list(LOSSES))
def test_every_family_is_finite_and_ignores_excluded_negatives(family: LossFamily) -> None:
    torch.manual_seed(2)
    user = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    item = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).requires_grad_(True)
    ids = torch.arange(5)
    per_row = None if family is LossFamily.SOFTMAX else 4
    config = LossConfig(family=family, negatives_per_row=per_row)
    scored = _in_batch_layout(user, item, ids)
    loss = retrieval_loss(scored, torch.tensor(0.1), torch.ones(5), config, torch.Generator())
    assert torch.isfinite(loss)
    loss.backward()
    assert item.grad is not None and torch.isfinite(item.grad).all()
    # Moving an excluded candidate (the diagonal: each row's own positive column) changes nothing.
    moved = ScoredCandidates(
        scored.positive,
        scored.negatives + torch.eye(5) * 7.0,
        scored.weights,
        scored.positive_log_q,
        scored.negative_log_q,
    )
    again = retrieval_loss(moved, torch.tensor(0.1), torch.ones(5), config, torch.Generator())
    torch.testing.assert_close(again, loss.detach())


def _subset_counts(index: torch.Tensor, valid: torch.Tensor) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for row, ok in zip(index.tolist(), valid.tolist()):
        key = tuple(sorted(c for c, v in zip(row, ok) if v))
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_column_sampling_is_uniform_over_valid_subsets() -> None:
    """Chi-square of the drawn 3-subsets of 8 valid columns among 40 (rejection path) against
    the uniform 1/C(8, 3); rows with 2 valid columns (the exact fallback) keep both."""
    from math import comb

    from scipy.stats import chisquare

    rows, columns, k = 28_000, 40, 3
    weights = torch.zeros(rows, columns)
    live = [0, 5, 6, 13, 21, 22, 30, 39]
    weights[:, live] = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 3.0, 1.0])
    weights[:200] = 0.0
    weights[:200, [4, 17]] = 1.0  # rows with fewer valid columns than k
    index, valid = sample_negative_columns(weights, k, torch.Generator().manual_seed(0))
    assert index.shape == (rows, k)
    few = _subset_counts(index[:200], valid[:200])
    assert few == {(4, 17): 200}
    assert bool(valid[200:].all())
    counts = _subset_counts(index[200:], valid[200:])
    assert all(len(s) == k and set(s) <= set(live) for s in counts)
    observed = [counts.get(tuple(s), 0) for s in itertools.combinations(live, k)]
    assert len(observed) == comb(len(live), k)
    assert chisquare(observed).pvalue > 1e-3
    # The same test rejects a biased draw (it can fail): drop one subset's draws.
    biased = list(observed)
    biased[0] //= 3
    assert chisquare(biased).pvalue < 1e-3
