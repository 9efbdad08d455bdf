"""One training step: forward, loss, a collective vote (finite loss? stop requested?),
backward and the optimizer updates.

The fused table optimizer updates inside ``backward()``, so a non-finite loss must be caught
before it; the decision is one all-reduce, so every rank skips (or stops) together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from config import ExperimentConfig, LossFamily
from data_pipeline.batch import Batch
from data_pipeline.manifest import Manifest
from models.blocked_softmax import shared_softmax_loss
from models.debias import DebiasedWeights, debiased_weights
from models.light_ranker import light_head_loss
from models.loss_families import logged_bce_loss
from models.losses import net_user_value
from models.retrieval_loss import ScoredCandidates, family_loss, retrieval_loss
from models.tower_outputs import TowerOutputs
from trainer.distillation import Distillation
from trainer.negatives.negative_sampling import (
    CandidateBlock,
    ExtraItems,
    NegativeSampling,
    step_generator,
)
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
    outputs = model(
        batch.user_features, batch.item_features, features, batch.position, batch.window_targets
    )
    ctx.negatives.observe(batch, step)
    value = net_user_value(batch.labels, ctx.label_weights)
    debiased = debiased_weights(value, outputs.debias, ctx.config.model.debias, batch.weight)
    loss, in_batch, scored = _retrieval_loss(
        outputs, batch, extra, step, value, debiased, generator, ctx
    )
    loss = loss + light_head_loss(model, outputs, batch, ctx.config)
    if ctx.distillation is not None:
        if scored is None and ctx.config.distillation.listwise.enabled:
            scored, _ = ctx.negatives.score(outputs, batch, extra, step)  # logged_bce built none
        positive = (outputs.user * outputs.item).sum(dim=1) if scored is None else scored.positive
        loss = loss + ctx.distillation.loss(batch, positive, scored, outputs.temperature, generator)
    loss = loss + debiased.aux_loss  # the heads' MSE: gradient reaches only the heads
    assert ctx.guard is not None
    verdict = ctx.guard.vote(loss, batch, step)
    if verdict.skip:
        return StepOutcome({"loss": loss.detach()}, True, verdict.stop)
    loss.backward()
    ctx.dense_optimizer.step()
    if in_batch is not None:
        ctx.negatives.remember(in_batch, step)
    return StepOutcome({"loss": loss.detach()}, False, verdict.stop)


def _retrieval_loss(
    outputs: TowerOutputs,
    batch: Batch,
    extra: ExtraItems | None,
    step: int,
    value: torch.Tensor,
    debiased: DebiasedWeights,
    generator: torch.Generator,
    ctx: StepContext,
) -> tuple[torch.Tensor, CandidateBlock | None, ScoredCandidates | None]:
    """The configured family's loss, the in-batch block (for the memory) and the per-row
    layout when one was built.

    ``logged_bce`` scores each row's own item against its label; the softmax over the shared
    candidates alone runs in linear memory; a family with ``loss.negatives_per_row`` over the
    shared candidates alone scores only its drawn columns; every other case lays the
    candidates out per row.
    """
    loss_config = ctx.config.loss
    if loss_config.family is LossFamily.LOGGED_BCE:
        logits = (outputs.user * outputs.item).sum(dim=1) / outputs.temperature
        labels = (value > 0).to(logits.dtype)
        # Not the NUV weights: they are 0 on the unengaged rows this family learns from.
        return logged_bce_loss(logits, labels, batch.weight), None, None
    row_weights = debiased.weights * batch.weight
    if ctx.negatives.uses_shared_softmax(extra):
        shared = ctx.negatives.shared(outputs, batch, extra)
        loss = shared_softmax_loss(
            outputs.user,
            shared.block.embeddings,
            shared.block.ids,
            shared.log_q,
            shared.positive_index,
            batch.item_ids,
            outputs.temperature,
            row_weights,
            loss_config.mask_accidental_hits,
            loss_config.block_rows,
        )
        return loss, shared.in_batch, None
    if ctx.negatives.uses_drawn_columns(extra):
        assert loss_config.negatives_per_row is not None
        drawn, in_batch = ctx.negatives.score_drawn(
            outputs, batch, extra, loss_config.negatives_per_row, generator
        )
        loss = family_loss(drawn, outputs.temperature, row_weights, loss_config)
        return loss, in_batch, drawn
    scored, in_batch = ctx.negatives.score(outputs, batch, extra, step)
    loss = retrieval_loss(scored, outputs.temperature, row_weights, loss_config, generator)
    return loss, in_batch, scored
