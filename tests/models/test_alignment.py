"""Reward-alignment losses against simple references, DPO's drift with and without the KL term,
and a tiny world where the answer is known: each user's reward is 1 on a known subset of items,
0 elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from config import AlignmentMethod
from models.alignment import (
    alignment_loss,
    dpo_loss,
    kl_to_reference,
    masked_log_softmax,
    reinforce_loss,
)


def _case(seed: int, users: int = 4, k: int = 6) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(users, k, generator=generator)
    reference = torch.randn(users, k, generator=generator)
    rewards = torch.rand(users, k, generator=generator)
    mask = torch.rand(users, k, generator=generator) < 0.8
    mask[:, 0] = True
    mask[-1] = False  # a padding user
    return scores, reference, rewards, mask


def _row_log_softmax(row: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(row)
    out[valid] = torch.log_softmax(row[valid], dim=0)
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_masked_log_softmax_matches_a_per_row_reference(seed: int) -> None:
    scores, _, _, mask = _case(seed)
    got = masked_log_softmax(scores, mask)
    for u in range(scores.shape[0]):
        assert torch.allclose(got[u], _row_log_softmax(scores[u], mask[u]), atol=1e-6)


def test_reinforce_gradient_is_the_exact_expected_reward_gradient() -> None:
    scores, _, rewards, mask = _case(1)
    scores.requires_grad_(True)
    loss, expected = reinforce_loss(masked_log_softmax(scores, mask), rewards, mask)
    (grad,) = torch.autograd.grad(loss.sum(), scores)
    # Reference: J_u = sum_i pi_i r_i over the valid items; the loss gradient is -dJ.
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)
    objective = (probs * rewards * mask).sum(dim=1)
    (reference,) = torch.autograd.grad(-objective.sum(), scores)
    assert torch.allclose(grad, reference, atol=1e-6)
    assert torch.allclose(expected, objective.detach(), atol=1e-6)
    assert not expected.requires_grad


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_kl_is_zero_at_the_reference_and_matches_the_formula(seed: int) -> None:
    scores, reference, _, mask = _case(seed)
    log_probs = masked_log_softmax(scores, mask)
    assert torch.allclose(kl_to_reference(log_probs, log_probs, mask), torch.zeros(4), atol=1e-6)
    reference_log_probs = masked_log_softmax(reference, mask)
    got = kl_to_reference(log_probs, reference_log_probs, mask)
    for u in range(scores.shape[0]):
        p = log_probs[u][mask[u]].exp()
        q = reference_log_probs[u][mask[u]].exp()
        assert float(got[u]) == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-5)
        assert float(got[u]) >= -1e-6


def test_dpo_matches_a_pair_loop() -> None:
    scores, reference, rewards, mask = _case(2)
    log_probs, reference_lp = masked_log_softmax(scores, mask), masked_log_softmax(reference, mask)
    beta = 0.7
    got, pairs = dpo_loss(log_probs, reference_lp, rewards, mask, beta)
    for u in range(scores.shape[0]):
        terms = []
        for i in range(scores.shape[1]):
            for j in range(scores.shape[1]):
                if mask[u, i] and mask[u, j] and rewards[u, i] > rewards[u, j]:
                    h = (log_probs[u, i] - reference_lp[u, i]) - (
                        log_probs[u, j] - reference_lp[u, j]
                    )
                    terms.append(-math.log(1 / (1 + math.exp(-beta * float(h)))))
        assert int(pairs[u]) == len(terms)
        assert float(got[u]) == pytest.approx(sum(terms) / max(len(terms), 1), abs=1e-5)


@pytest.mark.parametrize("method", list(AlignmentMethod))
def test_reward_and_reference_get_no_gradient(method: AlignmentMethod) -> None:
    scores, reference, rewards, mask = _case(3)
    for tensor in (scores, reference, rewards):
        tensor.requires_grad_(True)
    result = alignment_loss(scores, reference, rewards, mask, method, 0.5)
    result.loss.backward()
    assert reference.grad is None and rewards.grad is None
    assert scores.grad is not None and scores.grad[mask].abs().sum() > 0
    assert scores.grad[~mask].abs().sum() == 0  # padding users and repeats: nothing
    assert result.kl.requires_grad is False and result.expected_reward.requires_grad is False


def test_kl_term_is_zero_at_the_reference_and_pulls_back_toward_it() -> None:
    scores, _, rewards, mask = _case(4)
    at_reference = alignment_loss(scores, scores, rewards, mask, AlignmentMethod.REINFORCE, 1.0)
    assert float(at_reference.kl) == pytest.approx(0.0, abs=1e-6)
    assert float(at_reference.loss) == pytest.approx(float(at_reference.policy_term), abs=1e-6)


def _optimize_dpo(kl_coefficient: float, checkpoints: tuple[int, ...]) -> list[tuple[float, float]]:
    """Free policy logits over fixed sets (4 users x 6 items), started at the reference and
    trained by Adam on the DPO objective. Returns, after each checkpoint's number of steps,
    (KL to the reference, smallest probability of a user's best item), then (KL of the greedy
    policy: the most the sets allow, 1.0)."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(4, 6, generator=generator)
    rewards = torch.rand(4, 6, generator=generator)
    mask = torch.ones(4, 6, dtype=torch.bool)
    best = (torch.arange(4), rewards.argmax(dim=1))
    scores = reference.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([scores], lr=0.3)
    out = []
    for step in range(1, max(checkpoints) + 1):
        result = alignment_loss(
            scores, reference, rewards, mask, AlignmentMethod.DPO, kl_coefficient, 1.0
        )
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        if step in checkpoints:
            kl = kl_to_reference(
                masked_log_softmax(scores.detach(), mask), masked_log_softmax(reference, mask), mask
            )
            probs = masked_log_softmax(scores.detach(), mask).exp()
            out.append((float(kl.mean()), float(probs[best].min())))
    out.append((float(-masked_log_softmax(reference, mask)[best].mean()), 1.0))
    return out


def test_dpo_alone_drifts_to_the_greedy_policy_and_the_kl_term_holds_it() -> None:
    # Deterministic preferences: DPO's loss keeps falling as the policy leaves the reference.
    (short, _), (long, best_probability), (greedy, _) = _optimize_dpo(0.0, (60, 400))
    assert long > short + 0.1 and best_probability > 0.95, (short, long, best_probability)
    assert long == pytest.approx(greedy, rel=0.05)
    # With the KL penalty the objective has an interior optimum: converged, far from greedy.
    (held_short, _), (held_long, held_best), _ = _optimize_dpo(1.0, (60, 400))
    assert held_long == pytest.approx(held_short, abs=0.01)
    assert held_long < 0.25 * greedy and held_best < 0.5, (held_long, held_best, greedy)


def test_the_kl_term_is_in_the_dpo_loss_and_reported() -> None:
    scores, reference, rewards, mask = _case(5)
    free = alignment_loss(scores, reference, rewards, mask, AlignmentMethod.DPO, 0.0, 0.7)
    held = alignment_loss(scores, reference, rewards, mask, AlignmentMethod.DPO, 2.0, 0.7)
    assert float(free.loss) == pytest.approx(float(free.policy_term), abs=1e-6)
    assert float(held.kl) > 0 and float(held.policy_term) == pytest.approx(float(free.policy_term))
    assert float(held.loss) == pytest.approx(float(held.policy_term + 2.0 * held.kl), abs=1e-6)


# --- a tiny world where the answer is known ------------------------------------------------------

USERS, ITEMS, DIM, GROUPS = 12, 40, 8, 4


def _known_rewards() -> torch.Tensor:
    """[U, N]: user u values exactly the items of its group (i % GROUPS == u % GROUPS)."""
    users, items = torch.arange(USERS), torch.arange(ITEMS)
    return (items[None, :] % GROUPS == users[:, None] % GROUPS).float()


def _corpus_stats(
    user: torch.Tensor, item: torch.Tensor, reference: torch.Tensor, rewards: torch.Tensor
) -> tuple[float, float]:
    """(expected reward, mean KL to the reference) under the softmax over the whole corpus."""
    log_probs = torch.log_softmax(user @ item.T, dim=1)
    kl = (log_probs.exp() * (log_probs - torch.log_softmax(reference, dim=1))).sum(dim=1)
    return float((log_probs.exp() * rewards).sum(dim=1).mean()), float(kl.mean())


def _align_tiny_world(
    method: AlignmentMethod, kl_coefficient: float, steps: int = 150, beta: float = 1.0
) -> tuple[float, float, float]:
    """Policy: free user and item embeddings, initially near-indifferent (small random init).
    Each step: the policy's top-4 plus 8 uniform exploration draws per user, known rewards.
    Returns (corpus expected reward before, after, corpus KL to the start after)."""
    generator = torch.Generator().manual_seed(0)
    user = (0.01 * torch.randn(USERS, DIM, generator=generator)).requires_grad_(True)
    item = (0.01 * torch.randn(ITEMS, DIM, generator=generator)).requires_grad_(True)
    reference = (user @ item.T).detach()
    rewards = _known_rewards()
    before, _ = _corpus_stats(user.detach(), item.detach(), reference, rewards)
    optimizer = torch.optim.Adam([user, item], lr=0.05)
    rows = torch.arange(USERS)[:, None]
    for _ in range(steps):
        with torch.no_grad():
            top = (user @ item.T).topk(4, dim=1).indices
        explore = torch.randint(ITEMS, (USERS, 8), generator=generator)
        ids = torch.cat([top, explore], dim=1)
        repeated = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(12, 12).tril(-1).bool()).any(
            2
        )
        scores = (user[:, None, :] * item[ids]).sum(-1)
        result = alignment_loss(
            scores,
            reference[rows, ids],
            rewards[rows, ids],
            ~repeated,
            method,
            kl_coefficient,
            beta,
        )
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    after, kl = _corpus_stats(user.detach(), item.detach(), reference, rewards)
    return before, after, kl


@pytest.mark.parametrize(
    ("method", "kl", "beta"),
    [(AlignmentMethod.REINFORCE, 0.01, 1.0), (AlignmentMethod.DPO, 0.01, 0.5)],
)
def test_alignment_raises_the_expected_reward_on_a_known_world(
    method: AlignmentMethod, kl: float, beta: float
) -> None:
    before, after, _ = _align_tiny_world(method, kl, beta=beta)
    assert before == pytest.approx(1 / GROUPS, abs=0.02)  # indifferent: the group's share
    assert after > 0.6, (before, after)


def test_a_larger_kl_coefficient_keeps_the_policy_nearer_the_reference() -> None:
    _, loose_reward, loose_kl = _align_tiny_world(AlignmentMethod.REINFORCE, 0.0)
    _, tight_reward, tight_kl = _align_tiny_world(AlignmentMethod.REINFORCE, 5.0)
    assert tight_kl < 0.5 * loose_kl, (tight_kl, loose_kl)
    assert tight_reward < loose_reward
