"""One training step: forward, loss, a collective vote (finite loss? stop requested?),
backward and the optimizer updates.

The fused table optimizer updates inside ``backward()``, so a non-finite loss must be caught
before it; the decision is one all-reduce, so every rank skips (or stops) together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from config import ExperimentConfig
from data_pipeline.batch import Batch
from data_pipeline.manifest import Manifest
from models.debias import debiased_weights
from models.light_ranker import light_head_loss
from models.losses import net_user_value
from models.retrieval_loss import retrieval_loss
from trainer.distillation import Distillation
from trainer.negatives.negative_sampling import NegativeSampling, step_generator
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.step_guard import StepGuard, StepOutcome

logger = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a training step needs besides the model and the batch.

    Args:
        dense_optimizer: optimizer of the data-parallel parameters.
        label_weights: [T] net-user-value weights.
        negatives: the configured negative sources.
        manifest: the dataset manifest (corpus for mined negatives).
        config: the experiment configuration.
        env: this rank (seeds the step's random draws; device for the vote).
        guard: the pre-update vote (``Session.guard()``: stop signals, bad batches saved
            under the run); None: a vote without either.
        distillation: losses from the ranker (``Distillation.build``, which loads the teacher:
            the job builds it explicitly on every rank); None: no distillation.
    """

    dense_optimizer: torch.optim.Optimizer
    label_weights: torch.Tensor
    negatives: NegativeSampling
    manifest: Manifest
    config: ExperimentConfig
    env: DistributedEnv
    guard: StepGuard | None = None
    distillation: Distillation | None = None

    def __post_init__(self) -> None:
        if self.guard is None:
            self.guard = StepGuard(self.env)


def train_step(model: torch.nn.Module, batch: Batch, step: int, ctx: StepContext) -> StepOutcome:
    """One step (collective)."""
    ctx.dense_optimizer.zero_grad()
    generator = step_generator(ctx.config.seed, ctx.env.rank, step, batch.item_ids.device)
    extra = ctx.negatives.plan(model, batch, step, generator, ctx.manifest)
    features = ctx.negatives.features(extra)
    outputs = model(batch.user_features, batch.item_features, features, batch.position)
    ctx.negatives.observe(batch, step)
    scored, in_batch = ctx.negatives.score(outputs, batch, extra, step)
    value = net_user_value(batch.labels, ctx.label_weights)
    debiased = debiased_weights(value, outputs.debias, ctx.config.model.debias, batch.weight)
    row_weights = debiased.weights * batch.weight
    loss = retrieval_loss(scored, outputs.temperature, row_weights, ctx.config.loss, generator)
    loss = loss + light_head_loss(model, outputs, batch, ctx.config)
    if ctx.distillation is not None:
        loss = loss + ctx.distillation.loss(batch, scored, outputs.temperature, generator)
    loss = loss + debiased.aux_loss  # the heads' MSE: gradient reaches only the heads
    assert ctx.guard is not None
    verdict = ctx.guard.vote(loss, batch, step)
    if verdict.skip:
        return StepOutcome({"loss": loss.detach()}, True, verdict.stop)
    loss.backward()
    ctx.dense_optimizer.step()
    ctx.negatives.remember(in_batch, step)
    return StepOutcome({"loss": loss.detach()}, False, verdict.stop)
