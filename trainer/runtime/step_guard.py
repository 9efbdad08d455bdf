"""The one collective decision before an update, shared by every job's step.

The fused table optimizers update inside backward, so whether a step may update must be known on
every rank before any rank calls backward. One small all-reduce answers both questions a step
boundary has: is some rank's loss not finite (then no rank updates; the batch that produced it
is saved under ``<run>/bad_batches``), and has some rank been asked to stop by a signal (then
every rank finishes this step, the job saves and stops). What a skipped step means for the run
is ``train.non_finite_loss`` (skip or halt) and ``train.max_skipped_steps``: :func:`count_skip`,
which the training loop applies to every job's :class:`StepOutcome`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from config import NonFinitePolicy
from data_pipeline.batch import Batch
from trainer.runtime.checkpoint import Progress
from trainer.runtime.distributed import DistributedEnv, any_rank_has_each
from trainer.runtime.signals import StopSignals

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped on non-finite losses (``train.non_finite_loss`` / ``max_skipped_steps``)."""


@dataclass(frozen=True)
class Verdict:
    """Args:
    skip: some rank's loss was not finite: no rank updates anything this step.
    stop: some rank received a stop signal: the job saves after this step and stops.
    """

    skip: bool
    stop: bool


@dataclass(frozen=True)
class StepOutcome:
    """What a job's step reports to the loop.

    Args:
        losses: scalar (detached) losses of this rank's batch by name, ``loss`` the optimised
            one (alignment adds its KL and sampled reward); averaged per logging window.
        skipped: some rank's loss was not finite; no rank updated anything.
        stop: some rank received a stop signal; the loop saves and stops after this step.
    """

    losses: dict[str, torch.Tensor]
    skipped: bool
    stop: bool

    @property
    def loss(self) -> torch.Tensor:
        return self.losses["loss"]


@dataclass
class StepGuard:
    """Args:
    env: this rank.
    stop: the job's stop signals (None: none caught).
    bad_batch_dir: where a batch with a non-finite loss is saved (None: not saved).
    """

    env: DistributedEnv
    stop: StopSignals | None = None
    bad_batch_dir: Path | None = None

    def vote(self, loss: torch.Tensor, batch: Batch, step: int) -> Verdict:
        """Collective: call on every rank with this rank's loss of ``step`` (0-based)."""
        local_bad = not bool(torch.isfinite(loss.detach()))
        requested = self.stop is not None and self.stop.requested
        skip, stop = any_rank_has_each([local_bad, requested], self.env.device)
        if local_bad and self.bad_batch_dir is not None:
            name = f"step-{step + 1}-rank-{self.env.rank}.pt"
            saved = save_batch(batch, self.bad_batch_dir / name)
            logger.error(
                "step %d: loss %s on rank %d; batch saved to %s",
                step + 1,
                float(loss),
                self.env.rank,
                saved,
            )
        return Verdict(skip, stop)


def count_skip(
    progress: Progress,
    policy: NonFinitePolicy,
    max_skipped: int,
    where: Path | None,
    section: str = "train",
) -> None:
    """Counts a skipped step; raises :class:`NonFiniteLossError` when ``policy`` says halt or
    more than ``max_skipped`` steps were skipped (``where``: the bad-batch folder, ``section``
    the job's loop section, for the message)."""
    progress.skipped_steps += 1
    if policy is NonFinitePolicy.HALT or progress.skipped_steps > max_skipped:
        raise NonFiniteLossError(
            f"step {progress.step}: non-finite loss ({progress.skipped_steps} skipped so far; "
            f"{section}.non_finite_loss={policy.value}, "
            f"{section}.max_skipped_steps={max_skipped}); the batch is in {where}"
        )


def save_batch(batch: Batch, path: Path) -> Path:
    """Writes a batch as plain tensors (readable with ``torch.load(weights_only=True)``); each
    is copied out, since a loader's batch views one packed buffer."""
    tensors: dict[str, object] = {}
    for side, features in (("user", batch.user_features), ("item", batch.item_features)):
        tensors[f"{side}_keys"] = list(features.keys())
        tensors[f"{side}_values"] = features.values().cpu().clone()
        tensors[f"{side}_lengths"] = features.lengths().cpu().clone()
        if features.weights_or_none() is not None:
            tensors[f"{side}_weights"] = features.weights().cpu().clone()
    for name in ("labels", "position", "user_ids", "item_ids", "ranker_score", "weight"):
        tensors[name] = getattr(batch, name).cpu().clone()
    tensors["impression_negatives"] = batch.impression_negatives.cpu().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return path
