"""Reward alignment of the retrieval model (RLHF-style): pure losses over sampled item sets.

The retrieval model is the policy, the frozen ranker the reward model and a frozen copy of the
pre-alignment retrieval model the reference. For each user u the trainer samples a set S_u of K
items (the policy's top-N plus exploration samples from the corpus) and scores them.

Policy over the sampled set. The policy's log-probabilities are a softmax over S_u, not over the
whole corpus: ``log pi(i | u) = s_ui - logsumexp_{j in S_u} s_uj`` with ``s = <user, item> / T``.
Over the corpus the normalizer would need every item's embedding with a gradient at every step;
over S_u it costs K items per user, and S_u holds the items that matter (the policy's own top,
where a corpus softmax puts most of its mass, plus exploration that keeps the rest in reach).
The reference uses the same renormalization, so ``KL(pi || pi_ref)`` is over the same set.

REINFORCE with a baseline. The policy picks one item of S_u; its expected reward is
``J_u = sum_i pi_i r_i``. The loss ``- sum_i sg(pi_i) (r_i - b_u) log pi_i`` with the value
baseline ``b_u = sum_i sg(pi_i) r_i`` (``sg`` = stop-gradient) has gradient ``-grad J_u``: every
sampled item is an action, weighted by how likely the policy is to take it, and its advantage is
its reward minus what the policy earns on average. Enumerating the K actions instead of drawing
one gives the same expectation without the sampling noise.

DPO-style preferences. Pairs (i, j) of S_u that the ranker orders (``r_i > r_j + margin``) are
preferences i > j; the loss is ``-log sigmoid(beta * ((log pi_i - log ref_i) - (log pi_j -
log ref_j)))``, averaged over pairs, plus ``kl_coefficient * KL(pi || pi_ref)`` as for REINFORCE.
DPO's ``beta`` is a KL coefficient only when preferences are Bradley-Terry draws (each order of
a pair appears in proportion to ``sigmoid(r_i - r_j)``): then the loss is minimal at
``beta (h_i - h_j) = r_i - r_j``, the KL-regularized optimum. The ranker's preferences here are
deterministic (i always beats j), so each pair's loss only falls as ``h_i - h_j -> inf``: whatever
``beta``, the loss decreases toward the greedy policy (all of pi on the set's best item), the
largest drift the set allows. The explicit KL term gives an optimum strictly inside.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from config import AlignmentMethod


class AlignmentLoss(NamedTuple):
    """Args:
    loss: [] what to minimize.
    policy_term: [] the REINFORCE or DPO term alone.
    kl: [] mean KL(policy || reference) over users with a sampled set (detached).
    expected_reward: [] mean over users of sum_i pi_i r_i on the sampled set (detached).
    """

    loss: torch.Tensor
    policy_term: torch.Tensor
    kl: torch.Tensor
    expected_reward: torch.Tensor


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the valid entries of each row.

    Args:
        scores: [U, K] logits.
        mask: [U, K] bool, True where the item belongs to the row's set.

    Returns:
        [U, K] log-probabilities; 0 at masked entries and in rows without any valid entry.
    """
    filled = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(dim=1, keepdim=True)
    log_probs = torch.log_softmax(filled.masked_fill(empty, 0.0), dim=1)
    return log_probs.masked_fill(~mask, 0.0)


def _user_mean(values: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """Mean of [U] ``values`` over the True entries of [U] ``users`` (0 with a graph if none)."""
    weights = users.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def kl_to_reference(
    log_probs: torch.Tensor, reference_log_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-user KL(pi || pi_ref) over the sampled set.

    Args:
        log_probs: [U, K] policy log-probabilities (``masked_log_softmax``).
        reference_log_probs: [U, K] the reference's, over the same sets.
        mask: [U, K] bool.

    Returns:
        [U] sum_i pi_i (log pi_i - log ref_i) over valid i (0 for empty rows); gradient flows to
        ``log_probs`` only when ``reference_log_probs`` is detached.
    """
    terms = log_probs.exp() * (log_probs - reference_log_probs)
    return terms.masked_fill(~mask, 0.0).sum(dim=1)


def reinforce_loss(
    log_probs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with the value baseline over the sampled set (module docstring).

    Args:
        log_probs: [U, K] policy log-probabilities over each user's set.
        rewards: [U, K] ranker rewards (no gradient is taken through them).
        mask: [U, K] bool.

    Returns:
        loss: [U] ``- sum_i sg(pi_i) (r_i - b_u) log pi_i``, whose gradient is ``-grad J_u``.
        expected_reward: [U] J_u = sum_i pi_i r_i (detached).
    """
    rewards = rewards.detach().masked_fill(~mask, 0.0)
    probs = log_probs.detach().exp().masked_fill(~mask, 0.0)
    baseline = (probs * rewards).sum(dim=1, keepdim=True)
    advantage = (rewards - baseline).masked_fill(~mask, 0.0)
    loss = -(probs * advantage * log_probs).sum(dim=1)
    return loss, baseline.squeeze(1)


def dpo_loss(
    log_probs: torch.Tensor,
    reference_log_probs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise preference loss on ranker-ordered pairs of each user's set (DPO-style).

    Args:
        log_probs: [U, K] policy log-probabilities (a per-user constant cancels in a pair, so
            raw scores give the same loss).
        reference_log_probs: [U, K] the reference's.
        rewards: [U, K] ranker rewards.
        mask: [U, K] bool.
        beta: > 0, scale of the log-ratio margins (a KL coefficient only for preferences drawn
            Bradley-Terry style; see the module docstring).
        margin: a pair counts when ``r_i > r_j + margin``.

    Returns:
        loss: [U] mean over the user's preference pairs of ``-log sigmoid(beta * (h_i - h_j))``,
            ``h = log pi - log ref``; 0 for a user without pairs.
        pairs: [U] number of preference pairs of each user.
    """
    rewards = rewards.detach()
    ratio = log_probs - reference_log_probs.detach()
    valid = mask.unsqueeze(2) & mask.unsqueeze(1)
    preferred = valid & (rewards.unsqueeze(2) > rewards.unsqueeze(1) + margin)  # [U, i, j]
    logits = beta * (ratio.unsqueeze(2) - ratio.unsqueeze(1))
    terms = torch.nn.functional.logsigmoid(logits).neg().masked_fill(~preferred, 0.0)
    pairs = preferred.sum(dim=(1, 2))
    return terms.sum(dim=(1, 2)) / pairs.clamp(min=1).to(terms.dtype), pairs


def alignment_loss(
    scores: torch.Tensor,
    reference_scores: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    method: AlignmentMethod,
    kl_coefficient: float,
    beta: float = 1.0,
) -> AlignmentLoss:
    """The alignment objective of one batch of users: the method's term plus
    ``kl_coefficient`` * KL(policy || reference), both averaged over users.

    Args:
        scores: [U, K] policy logits of each user's sampled items (inner product / temperature).
        reference_scores: [U, K] the frozen reference's logits of the same pairs.
        rewards: [U, K] reward-model values (ranker NUV) of the same pairs.
        mask: [U, K] bool: False for padding users (whole row) and duplicate samples.
        method: REINFORCE or DPO (module docstring).
        kl_coefficient: >= 0, weight of the KL penalty (either method).
        beta: > 0, DPO's beta (unused by REINFORCE).

    Returns:
        ``AlignmentLoss``; the loss averages over users whose row has at least one valid item.
    """
    users = mask.any(dim=1)
    log_probs = masked_log_softmax(scores, mask)
    reference = masked_log_softmax(reference_scores.detach(), mask)
    kl = kl_to_reference(log_probs, reference, mask)
    if method is AlignmentMethod.REINFORCE:
        per_user, expected = reinforce_loss(log_probs, rewards, mask)
    else:
        per_user, _ = dpo_loss(log_probs, reference, rewards, mask, beta)
        probs = log_probs.detach().exp()
        expected = (probs * rewards.detach().masked_fill(~mask, 0.0)).sum(dim=1)
    policy_term = _user_mean(per_user, users)
    return AlignmentLoss(
        loss=policy_term + kl_coefficient * _user_mean(kl, users),
        policy_term=policy_term.detach(),
        kl=_user_mean(kl.detach(), users),
        expected_reward=_user_mean(expected, users),
    )
