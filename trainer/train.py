"""The retrieval training job: the two-tower model as a task of the one training loop
(``trainer.runtime.loop``): build -> restore -> for each batch: step -> log, checkpoint ->
evaluate.

A run resumes from the latest complete checkpoint of ``run.dir`` (``checkpoint.resume``), mid-epoch
at the exact row where it stopped; the result equals an uninterrupted run's.

Run as ``twotower train CONFIG [k=v ...]`` (one process) or
``torchrun --nproc_per_node 2 -m trainer.train CONFIG [k=v ...]``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torchrec.distributed import DistributedModelParallel

from config import ExperimentConfig
from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from trainer.build import (
    build_dense_optimizer,
    build_sharded_model,
    label_weights,
    loader_spec,
    with_teacher_user_features,
)
from trainer.distillation import Distillation
from trainer.evaluation.corpus import first_row_batch
from trainer.evaluation.evaluate import evaluate_model
from trainer.evaluation.validation import ValidationState, Validator, check_metric
from trainer.evaluation.validation import enabled as validation_enabled
from trainer.features import ResolvedFeatures, report, resolve_features
from trainer.negatives.negative_sampling import NegativeSampling
from trainer.runtime.checkpoint import best_checkpoint, load_model
from trainer.runtime.entry import run_job
from trainer.runtime.loop import (
    DIGEST_MODULUS,
    LoopResult,
    LoopSpec,
    TrainingLoop,
)
from trainer.runtime.run_files import TRAIN_SUMMARY_FILE
from trainer.runtime.session import Session
from trainer.runtime.state import CheckpointState, StatePart, sharded_model_parts
from trainer.runtime.step_guard import StepOutcome
from trainer.step import StepContext, train_step

logger = logging.getLogger(__name__)

__all__ = ["DIGEST_MODULUS", "TrainResult", "train"]


@dataclass
class TrainResult:
    """Args:
    steps: steps taken in the whole run (resumed parts included).
    rows_trained: live rows trained over all ranks and epochs.
    row_digest: order-free digest of the trained rows (``trainer.runtime.loop.row_digest``):
        equal to the split's digest times the epochs when every row was trained exactly once.
    final_loss: mean loss of the last logging window.
    samples_per_second: over this process's part of the run.
    checkpoint: the last checkpoint written.
    skipped_steps: steps skipped for a non-finite loss.
    stopped_by_signal: the signal that stopped the run early, or None.
    resumed_from: the checkpoint this process started from, or None.
    best_step: the step of the best validation (None without validation).
    stopped_early: training stopped for want of validation progress.
    """

    steps: int
    rows_trained: int
    row_digest: int
    final_loss: float
    samples_per_second: float
    checkpoint: str
    skipped_steps: int = 0
    stopped_by_signal: int | None = None
    resumed_from: str | None = None
    best_step: int | None = None
    stopped_early: bool = False

    @classmethod
    def of(cls, loop: LoopResult) -> TrainResult:
        return cls(
            steps=loop.steps,
            rows_trained=loop.rows_trained,
            row_digest=loop.row_digest,
            final_loss=loop.final_window.get("loss", float("nan")),
            samples_per_second=loop.samples_per_second,
            checkpoint=loop.checkpoint,
            skipped_steps=loop.skipped_steps,
            stopped_by_signal=loop.stopped_by_signal,
            resumed_from=loop.resumed_from,
            best_step=loop.best_step,
            stopped_early=loop.stopped_early,
        )


@dataclass
class RetrievalTask:
    """The retrieval job in the loop: the sharded two-tower model and its step context."""

    model: DistributedModelParallel
    context: StepContext
    loader: Any
    split: str
    reads: ResolvedFeatures  # what the loader reads: the model's features (+ the teacher's)

    @property
    def dense_optimizer(self) -> Any:
        return self.context.dense_optimizer

    @classmethod
    def build(
        cls,
        config: ExperimentConfig,
        manifest: Manifest,
        features: ResolvedFeatures,
        session: Session,
    ) -> RetrievalTask:
        """``features``: resolved once by the job; the listwise teacher's user features are
        read too when it scores the batches."""
        env = session.env
        model = build_sharded_model(manifest, config, env, features)
        if env.is_main:
            logger.info("sharding plan:\n%s", model.plan)
        context = StepContext(
            dense_optimizer=build_dense_optimizer(model, config),
            label_weights=label_weights(manifest, config).to(env.device),
            negatives=NegativeSampling.build(config, manifest, env, features),
            manifest=manifest,
            config=config,
            env=env,
            guard=session.guard(),
            # Collective when a teacher is loaded: every rank builds it, here.
            distillation=Distillation.build(config, manifest, env),
        )
        split = config.data.train_split
        listwise = config.distillation.listwise.enabled
        reads = with_teacher_user_features(features, manifest) if listwise else features
        loader = build_event_loader(
            loader_spec(config, split, True, manifest, reads), manifest, env.rank, env.world_size
        )
        return cls(model, context, loader, split, reads)

    def step(self, batch: Batch, step: int) -> StepOutcome:
        return train_step(self.model, batch, step, self.context)

    def fallback_batch(self) -> Batch:
        return first_row_batch(self.context.manifest, self.context.config, self.split, self.reads)

    def checkpoint_state(self) -> CheckpointState:
        negatives = self.context.negatives
        return CheckpointState(
            shared={
                **sharded_model_parts(self.model, self.context.dense_optimizer),
                "samplers": negatives,
            },
            rank={"samplers": StatePart(negatives.rank_state_dict, negatives.load_rank_state_dict)},
        )

    def meta(self) -> dict[str, Any]:
        return {}


def train(config: ExperimentConfig) -> TrainResult:
    manifest = Manifest.load(config.data.path)
    features = resolve_features(manifest, config)  # every rank: a ConfigError stops them all
    if validation_enabled(config):
        check_metric(config, manifest)
    session = Session.open(config)
    env, run_dir = session.env, session.run_dir
    try:
        if config.data.verify_checksums and env.is_main:
            manifest.verify_checksums(config.data.path, config.data.train_split)
        if env.is_main:
            report(features)
        task = RetrievalTask.build(config, manifest, features, session)
        validator = None
        if validation_enabled(config):
            state = ValidationState()
            validator = Validator(config, manifest, env, session.run_log, state, features)
        loop = TrainingLoop(session, task, LoopSpec.of(config.train), validator)
        loop.restore(config.checkpoint.resume_from)
        result = TrainResult.of(loop.run())
        if env.is_main:
            (run_dir / TRAIN_SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2))
        if config.eval.at_end and result.stopped_by_signal is None:
            _evaluate_at_end(task.model, manifest, features, config, session, result)
    finally:
        session.close()
    return result


def _evaluate_at_end(
    model: torch.nn.Module,
    manifest: Manifest,
    features: ResolvedFeatures,
    config: ExperimentConfig,
    session: Session,
    result: TrainResult,
) -> None:
    """Evaluates the best validation checkpoint, or the final weights; logged."""
    best = best_checkpoint(session.run_dir) if validation_enabled(config) else None
    if best is not None:
        load_model(best, model)
        logger.info("evaluating the best validation checkpoint (step %s)", result.best_step)
    name = best.name if best else Path(result.checkpoint).name
    metrics = evaluate_model(
        model, manifest, config, session.env, session.run_dir, checkpoint=name, features=features
    )
    session.run_log.log(
        {"step": result.steps, **{f"eval/{k}": v for k, v in metrics["model"].items()}}
    )


def main(argv: list[str] | None = None) -> int:
    # Stopped by a signal after saving: exit as the signal would have (a scheduler requeues).
    return run_job(
        "trainer.train",
        train,
        argv,
        lambda result: 128 + result.stopped_by_signal if result.stopped_by_signal else 0,
    )


if __name__ == "__main__":
    sys.exit(main())
