"""Trains the ranking model, a task of the one training loop (``trainer.runtime.loop``):
build -> restore -> for each batch: BCE step -> log, checkpoint -> per-task AUC on
``eval.split``.

The distributed path is the retrieval job's: DMP-sharded tables with the fused sparse
optimizer, ``build_dense_optimizer`` for the cross layers and MLP, the loop's padding of uneven
data, signals, non-finite policy and checkpoint folders ``<run.dir>/checkpoints/step-N`` that
``trainer.ranker_build.load_ranker`` reads.

Run as ``twotower train-ranker CONFIG [k=v ...]`` (``--nproc N`` for torchrun) or
``torchrun --nproc_per_node 2 -m trainer.ranker_train CONFIG [k=v ...]``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from torchrec.distributed import DistributedModelParallel

from config import ExperimentConfig
from data_pipeline.batch import Batch
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from models.ranker import ranker_bce_loss
from trainer.build import build_dense_optimizer
from trainer.negatives.negative_sampling import step_generator
from trainer.ranker_build import (
    build_sharded_ranker,
    ranker_first_row_batch,
    ranker_loader_spec,
    with_sampled_negatives,
)
from trainer.ranker_eval import evaluate_ranker, format_ranker_metrics
from trainer.runtime.entry import run_job
from trainer.runtime.loop import LoopResult, LoopSpec, TrainingLoop
from trainer.runtime.run_files import RANKER_METRICS_FILE, TRAIN_SUMMARY_FILE
from trainer.runtime.session import Session
from trainer.runtime.state import CheckpointState, sharded_model_parts
from trainer.runtime.step_guard import StepGuard, StepOutcome

logger = logging.getLogger(__name__)


@dataclass
class RankerTrainResult:
    """Args:
    steps: optimizer steps of the whole run (resumed parts included).
    first_loss, final_loss: mean loss (over ranks) of the first and last logging windows
        of this process's part of the run.
    skipped_steps: steps skipped for a non-finite loss on some rank.
    samples_per_second: logged rows per second over all ranks.
    checkpoint: the last checkpoint written.
    metrics: per-task evaluation metrics (``trainer.ranker_eval``); empty with
        ``eval.at_end=false`` or after a stop signal.
    resumed_from: the checkpoint this process started from, or None.
    stopped_by_signal: the signal that stopped the run early (saved first), or None.
    rows_trained, row_digest: live rows trained over all ranks and epochs, and their
        order-free digest (as the retrieval job's).
    """

    steps: int
    first_loss: float
    final_loss: float
    skipped_steps: int
    samples_per_second: float
    checkpoint: str
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    stopped_by_signal: int | None = None
    rows_trained: int = 0
    row_digest: int = 0

    @classmethod
    def of(cls, loop: LoopResult) -> RankerTrainResult:
        return cls(
            steps=loop.steps,
            first_loss=loop.first_window.get("loss", float("nan")),
            final_loss=loop.final_window.get("loss", float("nan")),
            skipped_steps=loop.skipped_steps,
            samples_per_second=loop.samples_per_second,
            checkpoint=loop.checkpoint,
            resumed_from=loop.resumed_from,
            stopped_by_signal=loop.stopped_by_signal,
            rows_trained=loop.rows_trained,
            row_digest=loop.row_digest,
        )


@dataclass
class RankerTask:
    """The ranker job in the loop: BCE on logged labels (plus sampled negatives)."""

    config: ExperimentConfig
    manifest: Manifest
    model: DistributedModelParallel
    dense_optimizer: Any
    store: ItemFeatureStore | None  # the corpus for sampled negatives
    loader: Any
    guard: StepGuard

    @classmethod
    def build(cls, config: ExperimentConfig, manifest: Manifest, session: Session) -> RankerTask:
        env = session.env
        model = build_sharded_ranker(manifest, config, env)
        if env.is_main:
            logger.info("sharding plan:\n%s", model.plan)
        store = (
            ItemFeatureStore.load(config.data.path, manifest)
            if config.ranker.sampled_negatives
            else None
        )
        loader = build_event_loader(
            ranker_loader_spec(config, config.data.train_split, train=True),
            manifest,
            env.rank,
            env.world_size,
        )
        dense_optimizer = build_dense_optimizer(model, config, config.ranker.train)
        return cls(config, manifest, model, dense_optimizer, store, loader, session.guard())

    def step(self, batch: Batch, step: int) -> StepOutcome:
        """One collective BCE step on ``batch`` plus its sampled negatives."""
        self.dense_optimizer.zero_grad()
        env = self.guard.env
        generator = step_generator(self.config.seed, env.rank, step, env.device)
        examples = with_sampled_negatives(
            batch, self.store, self.config.ranker.sampled_negatives, generator
        )
        logits = self.model(
            examples.user_features,
            examples.item_features,
            examples.extra_item_features,
            examples.extra_rows,
        )
        loss = ranker_bce_loss(logits, examples.labels, examples.weights)
        # The fused table optimizer updates inside backward: decide before it, on every rank.
        verdict = self.guard.vote(loss, batch, step)
        if not verdict.skip:
            loss.backward()
            self.dense_optimizer.step()
        return StepOutcome({"loss": loss.detach()}, verdict.skip, verdict.stop)

    def fallback_batch(self) -> Batch:
        return ranker_first_row_batch(self.manifest, self.config, self.config.data.train_split)

    def checkpoint_state(self) -> CheckpointState:
        return CheckpointState(shared=sharded_model_parts(self.model, self.dense_optimizer))

    def meta(self) -> dict[str, Any]:
        return {"model": "ranker"}


def train_ranker(config: ExperimentConfig) -> RankerTrainResult:
    """Trains (or resumes) the ranker of ``config`` in the current process group; collective."""
    manifest = Manifest.load(config.data.path)
    session = Session.open(config)
    env = session.env
    try:
        if config.data.verify_checksums and env.is_main:
            manifest.verify_checksums(config.data.path, config.data.train_split)
        task = RankerTask.build(config, manifest, session)
        loop = TrainingLoop(session, task, LoopSpec.of(config.ranker.train, "ranker.train"))
        loop.restore(config.checkpoint.resume_from)
        result = RankerTrainResult.of(loop.run())
        if config.eval.at_end and result.stopped_by_signal is None:
            result.metrics = _evaluate(task, session, result.steps)
        if env.is_main:
            summary = json.dumps(asdict(result), indent=2)
            (session.run_dir / TRAIN_SUMMARY_FILE).write_text(summary)
    finally:
        session.close()
    return result


def _evaluate(task: RankerTask, session: Session, step: int) -> dict[str, float]:
    """Per-task metrics on ``eval.split``: logged, and written to ranker_metrics.json."""
    config, env = task.config, session.env
    metrics = evaluate_ranker(task.model, task.manifest, config, env)
    session.run_log.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
    if env.is_main:
        (session.run_dir / RANKER_METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        logger.info(
            "ranker on %s:\n%s",
            config.eval.split,
            format_ranker_metrics(metrics, tuple(task.manifest.schema.labels)),
        )
    return metrics


def main(argv: list[str] | None = None) -> int:
    # Stopped by a signal after saving: exit as the signal would have (a scheduler requeues).
    return run_job(
        "trainer.ranker_train",
        train_ranker,
        argv,
        lambda result: 128 + result.stopped_by_signal if result.stopped_by_signal else 0,
    )


if __name__ == "__main__":
    sys.exit(main())
