"""The training loop: build -> restore -> for each batch: step -> log, checkpoint -> evaluate.

A run resumes from the latest complete checkpoint of ``run.dir`` (``checkpoint.resume``), mid-epoch
at the exact row where it stopped; the result equals an uninterrupted run's.

Run as ``twotower train CONFIG [k=v ...]`` (one process) or
``torchrun --nproc_per_node 2 -m trainer.train CONFIG [k=v ...]``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import ExperimentConfig, to_dict, to_yaml
from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from trainer.build import (
    build_dense_optimizer,
    build_sharded_model,
    label_weights,
    loader_spec,
)
from trainer.distillation import Distillation
from trainer.evaluation.corpus import first_row_batch
from trainer.evaluation.evaluate import evaluate_model
from trainer.evaluation.validation import ValidationState, Validator, check_metric
from trainer.evaluation.validation import enabled as validation_enabled
from trainer.features import report, resolve_features
from trainer.negatives.negative_sampling import NegativeSampling
from trainer.runtime.checkpoint import (
    Checkpointer,
    Progress,
    best_checkpoint,
    load_model,
    resolve_checkpoint,
)
from trainer.runtime.distributed import (
    DistributedEnv,
    init_distributed,
    seed_everything,
)
from trainer.runtime.entry import run_job
from trainer.runtime.faults import fire_if_due, planned_fault
from trainer.runtime.lr_schedule import DenseLRSchedule
from trainer.runtime.run_files import BAD_BATCHES_DIR, CONFIG_FILE, TRAIN_SUMMARY_FILE
from trainer.runtime.run_logger import RunLogger
from trainer.runtime.signals import StopSignals
from trainer.runtime.step_guard import count_skip
from trainer.runtime.synchronized import synchronized
from trainer.step import StepContext, StepOutcome, train_step

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Args:
    steps: steps taken in the whole run (resumed parts included).
    rows_trained: live rows trained over all ranks and epochs.
    row_digest: order-free digest of the trained rows (sum of a hash of user id, item id
        and timestamp, modulo 2**61 - 1): equal to the split's digest times the epochs when
        every row was trained exactly once.
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


DIGEST_MODULUS = (1 << 61) - 1


def row_digest(batch: Batch) -> int:
    """Sum over live rows of a hash of (user id, item id, timestamp), modulo 2**61 - 1."""
    live = batch.weight > 0
    users = batch.user_ids[live].to(torch.int64) % DIGEST_MODULUS
    items = batch.item_ids[live].to(torch.int64)
    mixed = (users * 1_000_003 + items * 7_919) % DIGEST_MODULUS
    return int(mixed.sum()) % DIGEST_MODULUS


@dataclass
class _Run:
    """The live objects of one training run (one rank)."""

    model: torch.nn.Module
    context: StepContext
    loader: Any
    env: DistributedEnv
    run_log: RunLogger
    checkpointer: Checkpointer
    progress: Progress
    fallback: Any
    schedule: DenseLRSchedule
    validator: Validator | None = None
    window: tuple[float, int] = (0.0, 0)  # restored logging window: loss sum, steps


def train(config: ExperimentConfig) -> TrainResult:
    env = init_distributed()
    seed_everything(config.seed)
    run_dir = Path(config.run.dir)
    manifest = Manifest.load(config.data.path)
    if config.data.verify_checksums and env.is_main:
        manifest.verify_checksums(config.data.path, config.data.train_split)
    features = resolve_features(manifest, config)  # every rank: a ConfigError stops them all
    if validation_enabled(config):
        check_metric(config, manifest)
    if env.is_main:
        report(features)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_yaml(config))
    dist.barrier()
    stop = StopSignals(config.checkpoint.signals)
    try:
        run = _build(config, manifest, env, run_dir, stop)
        resumed = _restore(run, config)
        run.run_log.start(run.progress.step if resumed else None)
        result = _loop(run, manifest.splits[config.data.train_split].rows)
        result.resumed_from = resumed
    finally:
        stop.close()
    if env.is_main:
        (run_dir / TRAIN_SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2))
    if config.eval.at_end and result.stopped_by_signal is None:
        best = best_checkpoint(run_dir) if run.validator is not None else None
        if best is not None:
            load_model(best, run.model)
            logger.info("evaluating the best validation checkpoint (step %s)", result.best_step)
        name = best.name if best else Path(result.checkpoint).name
        metrics = evaluate_model(run.model, manifest, config, env, run_dir, checkpoint=name)
        run.run_log.log(
            {"step": result.steps, **{f"eval/{k}": v for k, v in metrics["model"].items()}}
        )
    run.run_log.close()
    return result


def _build(
    config: ExperimentConfig,
    manifest: Manifest,
    env: DistributedEnv,
    run_dir: Path,
    stop: StopSignals,
) -> _Run:
    model = build_sharded_model(manifest, config, env)
    context = StepContext(
        dense_optimizer=build_dense_optimizer(model, config),
        label_weights=label_weights(manifest, config).to(env.device),
        negatives=NegativeSampling.build(config, manifest, env),
        manifest=manifest,
        config=config,
        env=env,
        stop=stop,
        bad_batch_dir=run_dir / BAD_BATCHES_DIR,
        # Collective when a teacher is loaded: every rank builds its context.
        distillation=Distillation.build(config, manifest, env),
    )
    loader = build_event_loader(
        loader_spec(config, config.data.train_split, True, manifest),
        manifest,
        env.rank,
        env.world_size,
    )
    if env.is_main:
        logger.info("sharding plan:\n%s", model.plan)
    run_log = RunLogger(
        run_dir,
        env.is_main,
        config.logging.wandb,
        config.logging.wandb_project,
        config.run.name,
        to_dict(config),
    )
    checkpointer = Checkpointer(run_dir, config.checkpoint, env.rank, env.world_size)
    split = config.data.train_split
    validator = None
    if validation_enabled(config):
        validator = Validator(config, manifest, env, run_log, ValidationState())
    return _Run(
        model,
        context,
        loader,
        env,
        run_log,
        checkpointer,
        Progress(),
        lambda: first_row_batch(manifest, config, split),
        DenseLRSchedule(
            context.dense_optimizer,
            config.train.dense_lr,
            config.train.lr_schedule,
            config.train.max_steps,
        ),
        validator,
    )


def _state_parts(run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """(replicated or sharded parts, this rank's parts) of a checkpoint. The tensors are the
    live ones (optimizer states included), so DCP loads in place."""
    fused: Any = run.model.fused_optimizer
    parts = {
        "model": run.model.state_dict(),
        "sparse_optimizer": fused.state_dict()["state"],
        "dense_optimizer": run.context.dense_optimizer.state_dict()["state"],
        "samplers": run.context.negatives.state_dict(),
    }
    if run.validator is not None:
        parts["validation"] = run.validator.state.to_tensor()
    window = torch.tensor(run.window, dtype=torch.float64)
    return parts, {"samplers": run.context.negatives.rank_state_dict(), "window": window}


def _restore(run: _Run, config: ExperimentConfig) -> str | None:
    """Loads the latest complete checkpoint of the run directory, if any and enabled."""
    if not config.checkpoint.resume:
        return None
    path = run.checkpointer.latest()
    if path is None and config.checkpoint.resume_from is not None:
        path = resolve_checkpoint(config.checkpoint.resume_from)
    if path is None:
        return None
    # The dense optimizer's state exists only after a first step; create it (a zero-gradient
    # step) so that DCP has tensors to load into. The parameters are loaded right after.
    run.context.dense_optimizer.init_state()  # type: ignore[attr-defined]
    parts, rank_parts = _state_parts(run)
    restored = run.checkpointer.restore(parts, rank_parts, path)
    assert restored is not None
    run.model.load_state_dict(parts["model"])
    run.context.negatives.load_state_dict(parts["samplers"])
    if run.validator is not None:
        run.validator.state.load(parts["validation"])
    if restored.rank_state is not None:
        run.context.negatives.load_rank_state_dict(restored.rank_state["samplers"])
        loss_sum, steps = restored.rank_state["window"].tolist()
        run.window = (loss_sum, int(steps))
    if restored.loader_state is not None:
        run.loader.load_state_dict(restored.loader_state)
    run.progress = restored.progress
    if run.env.is_main:
        logger.info(
            "resumed from %s: step %d, epoch %d, %d rows trained",
            restored.path,
            restored.progress.step,
            restored.progress.epoch,
            restored.progress.rows,
        )
    return str(restored.path)


@dataclass
class _Tally:
    """This rank's counts since the process started (the restored progress holds the rest)."""

    rows: int = 0
    digest: int = 0
    window_loss: float = 0.0
    window_steps: int = 0
    last_loss: float = float("nan")


def _global_progress(run: _Run, base: Progress, tally: _Tally) -> Progress:
    """Progress over all ranks and the whole run (collective)."""
    counts = torch.tensor([tally.rows, tally.digest], dtype=torch.int64, device=run.env.device)
    dist.all_reduce(counts)
    return Progress(
        step=run.progress.step,
        epoch=run.progress.epoch,
        rows=base.rows + int(counts[0]),
        skipped_steps=run.progress.skipped_steps,
        row_digest=(base.row_digest + int(counts[1])) % DIGEST_MODULUS,
    )


def _save(run: _Run, base: Progress, tally: _Tally, best: bool = False) -> Path:
    """Collective checkpoint at the current step (``best``: as the best validation checkpoint).
    The open logging window is saved too, so a resumed run logs the same records as an
    uninterrupted one."""
    run.window = (tally.window_loss, tally.window_steps)
    parts, rank_parts = _state_parts(run)
    progress = _global_progress(run, base, tally)
    meta = {"config": to_dict(run.context.config)}
    return run.checkpointer.save(
        parts, rank_parts, progress, run.loader.state_dict(), meta, best=best
    )


def _validate(
    run: _Run, base: Progress, tally: _Tally, epoch_end: bool = False, final: bool = False
) -> bool:
    """Validates when due, or the ``final`` weights unless just validated (collective); True
    when training should stop early."""
    validator = run.validator
    if validator is None or not validator.due(run.progress.step, epoch_end, final):
        return False
    return validator.validate(run.model, run.progress.step, lambda: _save(run, base, tally, True))


def _flush_window(run: _Run, tally: _Tally, rate: float | None = None) -> None:
    """Logs the mean loss of the open window (a window cut short by the end of the run is
    marked ``partial_window``; a run resumed from that step logs it again, complete)."""
    if not tally.window_steps:
        return
    tally.last_loss = _mean_across_ranks(tally.window_loss / tally.window_steps, run.env.device)
    record: dict[str, Any] = {
        "step": run.progress.step,
        "epoch": run.progress.epoch,
        "loss": tally.last_loss,
    }
    if rate is not None:
        record["samples_per_s"] = rate
    else:
        record["partial_window"] = True
    run.run_log.log(record)
    tally.window_loss, tally.window_steps = 0.0, 0


def _after_step(run: _Run, outcome: StepOutcome, batch: Batch, tally: _Tally) -> None:
    """Counts a finished step; a skipped step is counted, and fatal per the policy."""
    config = run.context.config.train
    if outcome.skipped:
        count_skip(run.progress, config, run.context.bad_batch_dir)
        return
    tally.rows += int((batch.weight > 0).sum())
    tally.digest = (tally.digest + row_digest(batch)) % DIGEST_MODULUS
    tally.window_loss += float(outcome.loss)
    tally.window_steps += 1


def _loop(run: _Run, rows_per_epoch: int) -> TrainResult:
    config, env = run.context.config, run.env
    total_steps = config.train.max_steps
    base = replace(run.progress)
    tally = _Tally(window_loss=run.window[0], window_steps=run.window[1])
    fault = planned_fault(env.rank)
    progress_bar = tqdm(
        total=total_steps,
        initial=run.progress.step,
        disable=not (env.is_main and config.train.progress_bar),
        unit="step",
    )
    start = window_start = time.perf_counter()
    stopped_by: int | None = None
    early = False
    run.model.train()
    for epoch in range(run.progress.epoch, config.train.epochs):
        if _finished(run, total_steps) or stopped_by is not None or early:
            break
        run.progress.epoch = epoch
        run.loader.dataset.set_epoch(epoch)
        for batch in synchronized(run.loader, env, run.fallback):
            run.schedule.apply(run.progress.step)
            outcome = train_step(run.model, batch, run.progress.step, run.context)
            run.progress.step += 1
            _after_step(run, outcome, batch, tally)
            if run.progress.step % config.train.log_every_steps == 0 and tally.window_steps:
                elapsed = time.perf_counter() - window_start
                rate = tally.window_steps * batch.size * env.world_size / max(elapsed, 1e-9)
                _flush_window(run, tally, rate)
                progress_bar.set_postfix(loss=f"{tally.last_loss:.4f}", samples_s=f"{rate:,.0f}")
                window_start = time.perf_counter()
            progress_bar.update(1)
            if outcome.stop:
                stopped_by = run.context.stop.received if run.context.stop else None
                stopped_by = stopped_by or 15
            if stopped_by is not None or _finished(run, total_steps):
                break
            early = _validate(run, base, tally)
            if early:
                break
            if run.checkpointer.due(run.progress.step):
                _save(run, base, tally)
            fire_if_due(fault, run.progress.step)
        else:
            early = _validate(run, base, tally, epoch_end=True)
    if stopped_by is None and run.validator is not None:
        _validate(run, base, tally, final=True)
    progress_bar.close()
    run.checkpointer.finish()
    latest = run.checkpointer.latest()
    if latest is not None and latest.name == f"step-{run.progress.step}":
        checkpoint = latest  # the last step was just saved
    else:
        checkpoint = _save(run, base, tally)
    _flush_window(run, tally)
    run.checkpointer.finish()
    seconds = time.perf_counter() - start
    final = _global_progress(run, base, tally)
    logger.info("trained %d steps, %d rows (%d per epoch)", final.step, final.rows, rows_per_epoch)
    return TrainResult(
        steps=final.step,
        rows_trained=final.rows,
        row_digest=final.row_digest,
        final_loss=tally.last_loss,
        samples_per_second=(final.rows - base.rows) / max(seconds, 1e-9),
        checkpoint=str(checkpoint),
        skipped_steps=final.skipped_steps,
        stopped_by_signal=stopped_by,
        best_step=run.validator.state.best_step if run.validator is not None else None,
        stopped_early=early,
    )


def _finished(run: _Run, total_steps: int | None) -> bool:
    return total_steps is not None and run.progress.step >= total_steps


def _mean_across_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


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
