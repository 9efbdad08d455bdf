"""Trains the ranking model: build -> restore -> for each batch: BCE step -> log, checkpoint ->
per-task AUC on ``eval.split``.

The distributed path is the retrieval trainer's: ``init_distributed``, DMP-sharded tables with
the fused sparse optimizer, ``build_dense_optimizer`` for the cross layers and MLP, the
``synchronized`` loader (zero-weight padding on uneven data) and ``Checkpointer`` folders
``<run.dir>/checkpoints/step-N`` that ``trainer.ranker_build.load_ranker`` reads.

Run as ``twotower train-ranker CONFIG [k=v ...]`` (``--nproc N`` for torchrun) or
``torchrun --nproc_per_node 2 -m trainer.ranker_train CONFIG [k=v ...]``.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel

from config import ExperimentConfig, to_dict, to_yaml
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
from trainer.runtime.checkpoint import Checkpointer, Progress, resolve_checkpoint
from trainer.runtime.distributed import (
    DistributedEnv,
    init_distributed,
    seed_everything,
)
from trainer.runtime.entry import run_job
from trainer.runtime.faults import fire_if_due, planned_fault
from trainer.runtime.lr_schedule import DenseLRSchedule
from trainer.runtime.run_files import (
    BAD_BATCHES_DIR,
    CONFIG_FILE,
    RANKER_METRICS_FILE,
    TRAIN_SUMMARY_FILE,
)
from trainer.runtime.run_logger import RunLogger
from trainer.runtime.signals import StopSignals
from trainer.runtime.step_guard import StepGuard, count_skip
from trainer.runtime.synchronized import synchronized

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


@dataclass
class _RankerRun:
    """The live objects of one ranker training run (one rank)."""

    config: ExperimentConfig
    manifest: Manifest
    env: DistributedEnv
    model: DistributedModelParallel
    dense_optimizer: Any
    store: ItemFeatureStore | None
    loader: Any
    checkpointer: Checkpointer
    run_log: RunLogger
    guard: StepGuard
    schedule: DenseLRSchedule
    progress: Progress = field(default_factory=Progress)


def train_ranker(config: ExperimentConfig) -> RankerTrainResult:
    """Trains (or resumes) the ranker of ``config`` in the current process group; collective."""
    env = init_distributed()
    seed_everything(config.seed)
    run_dir = Path(config.run.dir)
    manifest = Manifest.load(config.data.path)
    if config.data.verify_checksums and env.is_main:
        manifest.verify_checksums(config.data.path, config.data.train_split)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_yaml(config))
    dist.barrier()
    stop = StopSignals(config.checkpoint.signals)
    try:
        run = _build(config, manifest, env, run_dir, stop)
        resumed = _restore(run)
        run.run_log.start(run.progress.step if resumed else None)
        start_rows, start = run.progress.rows, time.perf_counter()
        first_loss, final_loss, stopped_by = _loop(run)
    finally:
        stop.close()
    seconds = time.perf_counter() - start
    latest = run.checkpointer.latest()
    if latest is not None and latest.name == f"step-{run.progress.step}":
        checkpoint = latest
    else:
        checkpoint = _save(run)
    result = RankerTrainResult(
        steps=run.progress.step,
        first_loss=first_loss,
        final_loss=final_loss,
        skipped_steps=run.progress.skipped_steps,
        samples_per_second=(run.progress.rows - start_rows) / max(seconds, 1e-9),
        checkpoint=str(checkpoint),
        resumed_from=resumed,
        stopped_by_signal=stopped_by,
    )
    if config.eval.at_end and stopped_by is None:
        result.metrics = evaluate_ranker(run.model, manifest, config, env)
        run.run_log.log(
            {"step": result.steps, **{f"eval/{k}": v for k, v in result.metrics.items()}}
        )
        if env.is_main:
            (run_dir / RANKER_METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))
            logger.info(
                "ranker on %s:\n%s",
                config.eval.split,
                format_ranker_metrics(result.metrics, tuple(manifest.schema.labels)),
            )
    if env.is_main:
        (run_dir / TRAIN_SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2))
    run.run_log.close()
    return result


def _build(
    config: ExperimentConfig,
    manifest: Manifest,
    env: DistributedEnv,
    run_dir: Path,
    stop: StopSignals,
) -> _RankerRun:
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
    run_log = RunLogger(
        run_dir,
        env.is_main,
        config.logging.wandb,
        config.logging.wandb_project,
        config.run.name,
        to_dict(config),
    )
    dense_optimizer = build_dense_optimizer(model, config)
    return _RankerRun(
        config=config,
        manifest=manifest,
        env=env,
        model=model,
        dense_optimizer=dense_optimizer,
        store=store,
        loader=loader,
        checkpointer=Checkpointer(run_dir, config.checkpoint, env.rank, env.world_size),
        run_log=run_log,
        guard=StepGuard(env, stop, run_dir / BAD_BATCHES_DIR),
        schedule=DenseLRSchedule(
            dense_optimizer,
            config.train.dense_lr,
            config.train.lr_schedule,
            config.train.max_steps,
        ),
    )


def _state_parts(run: _RankerRun) -> dict[str, Any]:
    """The live (DCP loads in place) model and optimizer states."""
    fused: Any = run.model.fused_optimizer
    return {
        "model": run.model.state_dict(),
        "sparse_optimizer": fused.state_dict()["state"],
        "dense_optimizer": run.dense_optimizer.state_dict()["state"],
    }


def _restore(run: _RankerRun) -> str | None:
    """Loads the run directory's latest complete checkpoint (or ``checkpoint.resume_from``)."""
    config = run.config.checkpoint
    if not config.resume:
        return None
    path = run.checkpointer.latest()
    if path is None and config.resume_from is not None:
        path = resolve_checkpoint(config.resume_from)
    if path is None:
        return None
    run.dense_optimizer.init_state()  # optimizer tensors for DCP to load into
    parts = _state_parts(run)
    restored = run.checkpointer.restore(parts, {}, path)
    assert restored is not None
    run.model.load_state_dict(parts["model"])
    if restored.loader_state is not None:
        run.loader.load_state_dict(restored.loader_state)
    run.progress = restored.progress
    if run.env.is_main:
        logger.info("resumed ranker from %s at step %d", restored.path, run.progress.step)
    return str(restored.path)


def _save(run: _RankerRun) -> Path:
    meta = {"config": to_dict(run.config), "model": "ranker"}
    return run.checkpointer.save(_state_parts(run), {}, run.progress, run.loader.state_dict(), meta)


def _step(run: _RankerRun, batch: Batch) -> tuple[torch.Tensor | None, bool]:
    """One collective BCE step on ``batch`` (plus its sampled negatives). Returns the detached
    loss (None when some rank's loss was not finite: then no rank updates anything) and whether
    some rank was asked to stop."""
    run.dense_optimizer.zero_grad()
    generator = step_generator(run.config.seed, run.env.rank, run.progress.step, run.env.device)
    examples = with_sampled_negatives(
        batch, run.store, run.config.ranker.sampled_negatives, generator
    )
    logits = run.model(
        examples.user_features,
        examples.item_features,
        examples.extra_item_features,
        examples.extra_rows,
    )
    loss = ranker_bce_loss(logits, examples.labels, examples.weights)
    # The fused table optimizer updates inside backward: decide before it, on every rank.
    verdict = run.guard.vote(loss, batch, run.progress.step)
    if verdict.skip:
        return None, verdict.stop
    loss.backward()
    run.dense_optimizer.step()
    return loss.detach(), verdict.stop


def _loop(run: _RankerRun) -> tuple[float, float, int | None]:
    """Epochs until ``train.epochs`` or ``train.max_steps``, or a stop signal (saved, then
    stop); (first, last) window mean loss and the stopping signal."""
    config, env = run.config.train, run.env
    fallback = functools.partial(
        ranker_first_row_batch, run.manifest, run.config, run.config.data.train_split
    )
    windows: list[float] = []
    window_loss, window_steps = 0.0, 0
    fault = planned_fault(env.rank)
    stopped_by: int | None = None
    run.model.train()
    for epoch in range(run.progress.epoch, config.epochs):
        if _finished(run) or stopped_by is not None:
            break
        run.progress.epoch = epoch
        run.loader.dataset.set_epoch(epoch)
        for batch in synchronized(run.loader, env, fallback):
            run.schedule.apply(run.progress.step)
            loss, stop = _step(run, batch)
            run.progress.step += 1
            if loss is None:
                count_skip(run.progress, config, run.guard.bad_batch_dir)
            else:
                run.progress.rows += _all_ranks_sum(int((batch.weight > 0).sum()), env)
                window_loss, window_steps = window_loss + float(loss), window_steps + 1
            if run.progress.step % config.log_every_steps == 0 and window_steps:
                windows.append(_log_window(run, window_loss / window_steps))
                window_loss, window_steps = 0.0, 0
            if stop:
                stopped_by = (run.guard.stop.received if run.guard.stop else None) or 15
            if _finished(run) or stopped_by is not None:
                break
            if run.checkpointer.due(run.progress.step):
                _save(run)
            fire_if_due(fault, run.progress.step)
    if window_steps:
        windows.append(_log_window(run, window_loss / window_steps))
    run.checkpointer.finish()
    if not windows:
        return float("nan"), float("nan"), stopped_by
    return windows[0], windows[-1], stopped_by


def _log_window(run: _RankerRun, local_mean: float) -> float:
    mean = _all_ranks_sum(local_mean, run.env) / run.env.world_size
    record = {"step": run.progress.step, "epoch": run.progress.epoch, "loss": mean}
    run.run_log.log(record)
    if run.env.is_main:
        logger.info("step %d epoch %d loss %.4f", run.progress.step, run.progress.epoch, mean)
    return mean


def _all_ranks_sum(value: float, env: DistributedEnv) -> Any:
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    result = tensor.item()
    return int(result) if isinstance(value, int) else result


def _finished(run: _RankerRun) -> bool:
    max_steps = run.config.train.max_steps
    return max_steps is not None and run.progress.step >= max_steps


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
