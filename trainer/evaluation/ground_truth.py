"""A retrieval model's top-K judged by a synthetic world's ground truth, not by a learned model.

For an eval row of user u whose top-K (exact MIPS over the corpus) is ``P_u`` and with ``V(u, i)``
the world's true expected NUV of an examined impression
(:func:`data_pipeline.datasets.synthetic_truth.expected_value`, under the reward's label
weights), with ``T_u`` the K corpus items of largest ``V(u, .)``:

- ``truth_reward = mean_{i in P_u} V(u, i)``: what the world would give for the policy's top-K;
- ``truth_recall = |P_u ∩ T_u| / K``: the share of the truly best K items the policy finds;
- ``truth_oracle = mean_{i in T_u} V(u, i)``: the ceiling of ``truth_reward``.

Reward hacking shows as the ranker's reward of the top-K going up while ``truth_reward`` and
``truth_recall`` stay flat or fall. Before and after are measured on the same rows, so each gain
comes with the standard error of its paired differences (``paired_summary``): the noise of the
eval sample that a gain must clear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from data_pipeline.datasets.synthetic_truth import (
    SyntheticTruth,
    corpus_values,
    load_synthetic_truth,
    pair_values,
)
from data_pipeline.manifest import Manifest
from trainer.runtime.distributed import DistributedEnv

logger = logging.getLogger(__name__)

# Bounds the [rows, corpus] value matrix of one piece of a batch (float64: 128 MiB).
CORPUS_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TruthScorer:
    """Args:
    truth: the world's truth, on the scoring device.
    corpus_ids: [n] int64 item ids the policy retrieves from (same device).
    label_weights: label name -> weight of the value being judged.
    """

    truth: SyntheticTruth
    corpus_ids: torch.Tensor
    label_weights: dict[str, float]


class TopKTruth(NamedTuple):
    """Per eval row, [U] float64 each (module docstring)."""

    truth_reward: torch.Tensor
    truth_recall: torch.Tensor
    truth_oracle: torch.Tensor


def true_top_k(scorer: TruthScorer, users: torch.Tensor, k: int) -> torch.Tensor:
    """[U, k] corpus item ids of the largest true value for ``users`` [U], best first, in
    pieces of at most :data:`CORPUS_CHUNK_ELEMENTS` values."""
    rows = max(1, CORPUS_CHUNK_ELEMENTS // max(1, len(scorer.corpus_ids)))
    k = min(k, len(scorer.corpus_ids))
    pieces = []
    for piece in torch.split(users, rows):
        values = corpus_values(scorer.truth, piece, scorer.corpus_ids, scorer.label_weights)
        pieces.append(scorer.corpus_ids[values.topk(k, dim=1).indices])
    return torch.cat(pieces) if pieces else users.new_zeros(0, k)


def top_k_truth(scorer: TruthScorer, users: torch.Tensor, top_ids: torch.Tensor) -> TopKTruth:
    """The truth of each row's top-K.

    Args:
        users: [U] int64 user ids (rows of ``truth.user_factors``).
        top_ids: [U, K] the policy's top-K item ids (distinct within a row).

    Returns:
        ``TopKTruth`` of [U] float64 tensors.
    """
    k = top_ids.shape[1]
    best = true_top_k(scorer, users, k)
    found = (top_ids.unsqueeze(2) == best.unsqueeze(1)).any(dim=2)  # [U, K]
    return TopKTruth(
        truth_reward=pair_values(scorer.truth, users, top_ids, scorer.label_weights).mean(dim=1),
        truth_recall=found.double().sum(dim=1) / k,
        truth_oracle=pair_values(scorer.truth, users, best, scorer.label_weights).mean(dim=1),
    )


def load_truth_scorer(
    root: str,
    manifest: Manifest,
    corpus_ids: torch.Tensor,
    label_weights: dict[str, float],
    device: torch.device,
) -> TruthScorer | None:
    """The scorer of the dataset at ``root``, or None (logged, with why) without ground truth."""
    truth = load_synthetic_truth(root, manifest)
    if truth is None:
        logger.info(
            "dataset %r (%s) records no ground truth (manifest extra['truth']): "
            "ground-truth metrics of the top-K are not reported",
            manifest.dataset,
            root,
        )
        return None
    if truth.device_effect:
        logger.warning(
            "ground truth leaves out the session-device effect on relevance "
            "(device_effect=%g): it is the device-free value u·v + item_bias",
            truth.device_effect,
        )
    logger.info("ground truth of the top-K under label weights %s", label_weights)
    return TruthScorer(truth.to(device), corpus_ids.to(device), label_weights)


class TopKRows(NamedTuple):
    """This rank's live eval rows in loader order (the same rows before and after).

    Args:
        reward: [R] float64 mean ranker reward of each row's top-K.
        truth: per-row ground truth of the same top-K, None without one.
    """

    reward: torch.Tensor
    truth: TopKTruth | None


def paired_summary(
    before: torch.Tensor, after: torch.Tensor, env: DistributedEnv
) -> tuple[float, float, float]:
    """(mean before, mean after, standard error of the mean difference) over the rows of
    every rank; ``before``, ``after``: [R] float64 values of the same rows. Collective."""
    difference = after - before
    sums = torch.stack(
        [
            torch.tensor(float(len(before)), dtype=torch.float64, device=before.device),
            before.sum(),
            after.sum(),
            difference.sum(),
            difference.square().sum(),
        ]
    ).to(env.device)
    dist.all_reduce(sums)
    rows, before_sum, after_sum, difference_sum, squares = sums.tolist()
    count = max(rows, 1.0)
    variance = max(squares - difference_sum**2 / count, 0.0) / max(rows - 1.0, 1.0)
    return before_sum / count, after_sum / count, (variance / count) ** 0.5


class TopKComparison(NamedTuple):
    """Before/after means over the eval rows of every rank (``AlignResult``'s fields): the
    ranker's reward, the ground truth's (None without one), and the standard errors of the
    paired gains."""

    reward_before: float
    reward_after: float
    reward_gain_stderr: float
    truth_reward_before: float | None = None
    truth_reward_after: float | None = None
    truth_reward_gain_stderr: float | None = None
    truth_recall_before: float | None = None
    truth_recall_after: float | None = None
    truth_oracle_reward: float | None = None


def compare_top_k(before: TopKRows, after: TopKRows, env: DistributedEnv) -> TopKComparison:
    """The same rows' top-K before and after; collective."""
    reward = paired_summary(before.reward, after.reward, env)
    if before.truth is None or after.truth is None:
        return TopKComparison(*reward)
    old, new = before.truth, after.truth
    truth = paired_summary(old.truth_reward, new.truth_reward, env)
    recall = paired_summary(old.truth_recall, new.truth_recall, env)
    oracle = paired_summary(old.truth_oracle, new.truth_oracle, env)[0]
    return TopKComparison(*reward, *truth, *recall[:2], oracle)
