"""The one training loop every job runs: retrieval training, ranker training, alignment and the
plain-PyTorch baseline.

    session = Session.open(config)          # process group, seed, run dir, signals, run log
    task = SomeTask.build(..., session)     # the job: model, optimizers, loader, step(batch)
    loop = TrainingLoop(session, task, LoopSpec.of(config.train))  # ranker.train, alignment.train
    loop.restore(config.checkpoint.resume_from)
    result = loop.run()                     # epochs, vote, log, checkpoints, final save
    session.close()

The loop owns what must behave the same in every job: restore of the latest complete
checkpoint (mid-epoch, at the exact row), the epoch loop with uneven-rank padding
(``synchronized``), the learning-rate schedule of the dense optimizer, the non-finite policy
(``count_skip``; the vote itself is in the task's step, before backward), stop signals (save,
then stop: exit 128 + signal), fault injection, the logging window (saved with the checkpoint,
so a resumed run logs the same records), validation and early stopping when the job has a
validator, the checkpoint cadence and the final save. A task supplies only what is its own.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from config import LRScheduleConfig, NonFinitePolicy, TrainConfig, to_dict
from data_pipeline.batch import Batch
from trainer.runtime.checkpoint import Checkpointer, Progress, resolve_checkpoint
from trainer.runtime.faults import fire_if_due, planned_fault
from trainer.runtime.lr_schedule import DenseLRSchedule
from trainer.runtime.run_files import BAD_BATCHES_DIR
from trainer.runtime.session import Session
from trainer.runtime.state import CheckpointState, StatePart, tensor_part
from trainer.runtime.step_guard import StepOutcome, count_skip
from trainer.runtime.synchronized import synchronized

logger = logging.getLogger(__name__)

DIGEST_MODULUS = (1 << 61) - 1


def row_digest(batch: Batch) -> int:
    """Sum over live rows of a hash of (user id, item id), modulo 2**61 - 1: an order-free
    fingerprint of which rows were trained."""
    live = batch.weight > 0
    users = batch.user_ids[live].to(torch.int64) % DIGEST_MODULUS
    items = batch.item_ids[live].to(torch.int64)
    mixed = (users * 1_000_003 + items * 7_919) % DIGEST_MODULUS
    return int(mixed.sum()) % DIGEST_MODULUS


@dataclass(frozen=True)
class LoopSpec:
    """How long a job trains and what its loop does on the way.

    Args:
        epochs: passes over the train split; None: as many as ``max_steps`` needs.
        max_steps: stop after this many steps (None: after ``epochs``).
        log_every_steps: the logging window.
        progress_bar: a tqdm bar on the main rank (else one log line per window).
        non_finite_loss, max_skipped_steps: what a skipped step means (``count_skip``).
        lr: the dense optimizer's base rate; ``lr_schedule`` scales it per step.
        section: the config section these come from (``train``, ``ranker.train``,
            ``alignment.train``), named in errors.
    """

    epochs: int | None
    max_steps: int | None
    log_every_steps: int
    progress_bar: bool
    non_finite_loss: NonFinitePolicy
    max_skipped_steps: int
    lr: float
    lr_schedule: LRScheduleConfig
    section: str = "train"

    @classmethod
    def of(cls, train: TrainConfig, section: str = "train") -> LoopSpec:
        """The spec of the loop section ``train`` (named ``section`` in errors)."""
        return cls(
            epochs=train.epochs,
            max_steps=train.max_steps,
            log_every_steps=train.log_every_steps,
            progress_bar=train.progress_bar,
            non_finite_loss=train.non_finite_loss,
            max_skipped_steps=train.max_skipped_steps,
            lr=train.dense_lr,
            lr_schedule=train.lr_schedule,
            section=section,
        )


class Task(Protocol):
    """A job's part of the loop.

    Attributes:
        model: the trained module (``train()`` is called before the first step).
        dense_optimizer: the optimizer the learning-rate schedule drives; ``init_state()``
            gives it state tensors for a checkpoint to load into.
        loader: a stateful loader whose dataset has ``set_epoch``.
    """

    @property
    def model(self) -> nn.Module: ...

    @property
    def dense_optimizer(self) -> Any: ...

    @property
    def loader(self) -> Any: ...

    def step(self, batch: Batch, step: int) -> StepOutcome:
        """One collective step on ``batch`` at global ``step`` (0-based); the task's step
        votes (``StepGuard``) before it updates anything."""
        ...

    def fallback_batch(self) -> Batch:
        """A batch for a rank with no data of its own this epoch (trained as padding)."""
        ...

    def checkpoint_state(self) -> CheckpointState:
        """The task's checkpoint parts (model, optimizers, samplers ...)."""
        ...

    def meta(self) -> dict[str, Any]:
        """JSON-safe additions to each checkpoint's meta.json."""
        ...


class Validation(Protocol):
    """A validator (``trainer.evaluation.validation.Validator``) as the loop uses it."""

    state: Any  # to_tensor() / load(tensor) / best_step

    def due(self, step: int, epoch_end: bool, final: bool = False) -> bool: ...

    def validate(self, model: nn.Module, step: int, save_best: Any) -> bool: ...


@dataclass
class LoopResult:
    """Args:
    steps: steps of the whole run (resumed parts and skipped steps included).
    rows_trained: live rows trained over all ranks and epochs.
    row_digest: order-free digest of the trained rows (:func:`row_digest` summed modulo
        2**61 - 1): the split's digest times the epochs when every row was trained once.
    first_window, final_window: means over ranks of the step's losses in the first and the
        last logging windows of this process's part of the run ({} when it took no step).
    samples_per_second: live rows per second over this process's part of the run.
    checkpoint: the last checkpoint written.
    skipped_steps: steps skipped for a non-finite loss.
    stopped_by_signal: the signal that stopped the run (saved first), or None.
    resumed_from: the checkpoint this process started from, or None.
    best_step: the step of the best validation (None without validation).
    stopped_early: training stopped for want of validation progress.
    """

    steps: int
    rows_trained: int
    row_digest: int
    first_window: dict[str, float]
    final_window: dict[str, float]
    samples_per_second: float
    checkpoint: str
    skipped_steps: int
    stopped_by_signal: int | None
    resumed_from: str | None
    best_step: int | None
    stopped_early: bool


@dataclass
class _Window:
    """The open logging window of this rank: loss sums over its steps."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.steps = dict(state["sums"]), int(state["steps"])


@dataclass
class _Tally:
    """This rank's live rows and their digest since the process started."""

    rows: int = 0
    digest: int = 0


class TrainingLoop:
    """Runs ``task`` under ``spec`` in ``session`` (collective: every rank runs every method).

    Args:
        validator: validation during training and early stopping (retrieval), or None.
    """

    def __init__(
        self,
        session: Session,
        task: Task,
        spec: LoopSpec,
        validator: Validation | None = None,
    ) -> None:
        env = session.env
        self.session, self.task, self.spec, self.validator = session, task, spec, validator
        self.checkpointer = Checkpointer(
            session.run_dir, session.config.checkpoint, env.rank, env.world_size
        )
        self.schedule = DenseLRSchedule(
            task.dense_optimizer, spec.lr, spec.lr_schedule, spec.max_steps
        )
        self.progress = Progress()
        self.window = _Window()
        self.resumed_from: str | None = None
        self.stopped_by: int | None = None
        self.stopped_early = False
        self._base = Progress()
        self._tally = _Tally()
        self._windows: list[dict[str, float]] = []

    def restore(self, resume_from: str | Path | None = None) -> str | None:
        """Loads the run directory's latest complete checkpoint or, when it has none,
        ``resume_from`` (a checkpoint or run directory); nothing with ``checkpoint.resume``
        false. Returns the checkpoint loaded."""
        if not self.session.config.checkpoint.resume:
            return None
        path = self.checkpointer.latest()
        if path is None and resume_from is not None:
            path = resolve_checkpoint(resume_from)
        if path is None:
            return None
        # The dense optimizer's state exists only after a first step; create it so that the
        # checkpoint has tensors to load into (the parameters are loaded right after).
        self.task.dense_optimizer.init_state()
        restored = self.checkpointer.restore(self._state(), path)
        assert restored is not None
        self.progress = restored.progress
        self.resumed_from = str(restored.path)
        if self.session.env.is_main:
            logger.info(
                "resumed from %s: step %d, epoch %d, %d rows trained",
                restored.path,
                self.progress.step,
                self.progress.epoch,
                self.progress.rows,
            )
        return self.resumed_from

    def run(self) -> LoopResult:
        """Trains until the spec's end, a stop signal or early stopping; saves the end.
        The stop signals are released when it returns."""
        self._base = replace(self.progress)
        self.session.run_log.start(self.progress.step if self.resumed_from else None)
        start = time.perf_counter()
        try:
            self._epochs()
            if self.stopped_by is None:
                self._validate(final=True)
            checkpoint = self._final_save()
        finally:
            self.session.stop.close()
        seconds = time.perf_counter() - start
        final = self._global_progress()
        if self.session.env.is_main:
            logger.info("trained %d steps, %d rows", final.step, final.rows)
        validation = self.validator.state if self.validator is not None else None
        return LoopResult(
            steps=final.step,
            rows_trained=final.rows,
            row_digest=final.row_digest,
            first_window=self._windows[0] if self._windows else {},
            final_window=self._windows[-1] if self._windows else {},
            samples_per_second=(final.rows - self._base.rows) / max(seconds, 1e-9),
            checkpoint=str(checkpoint),
            skipped_steps=final.skipped_steps,
            stopped_by_signal=self.stopped_by,
            resumed_from=self.resumed_from,
            best_step=validation.best_step if validation is not None else None,
            stopped_early=self.stopped_early,
        )

    def _epochs(self) -> None:
        spec, env = self.spec, self.session.env
        epochs: Iterable[int] = (
            itertools.count(self.progress.epoch)
            if spec.epochs is None
            else range(self.progress.epoch, spec.epochs)
        )
        bar = tqdm(
            total=spec.max_steps,
            initial=self.progress.step,
            disable=not (env.is_main and spec.progress_bar),
            unit="step",
        )
        self.task.model.train()
        try:
            for epoch in epochs:
                if self._finished():
                    break
                self.progress.epoch = epoch
                self.task.loader.dataset.set_epoch(epoch)
                if self._epoch(bar):
                    break
        finally:
            bar.close()

    def _epoch(self, bar: tqdm) -> bool:
        """One pass over this rank's loader; True when training ends inside it."""
        env, fault = self.session.env, planned_fault(self.session.env.rank)
        window_start = time.perf_counter()
        for batch in synchronized(self.task.loader, env, self.task.fallback_batch):
            self.schedule.apply(self.progress.step)
            outcome = self.task.step(batch, self.progress.step)
            self.progress.step += 1
            self._count(outcome, batch)
            if self.progress.step % self.spec.log_every_steps == 0 and self.window.steps:
                elapsed = time.perf_counter() - window_start
                rate = self.window.steps * batch.size * env.world_size / max(elapsed, 1e-9)
                self._flush_window(bar, rate)
                window_start = time.perf_counter()
            bar.update(1)
            if outcome.stop:
                self.stopped_by = self.session.stop.received or int(signal.SIGTERM)
            if self.stopped_by is not None or self._finished():
                return True
            if self._validate():
                return True
            if self.checkpointer.due(self.progress.step):
                self._save()
            fire_if_due(fault, self.progress.step)
        return self._validate(epoch_end=True)

    def _count(self, outcome: StepOutcome, batch: Batch) -> None:
        """Counts a finished step; a skipped step is counted, and fatal per the policy."""
        if outcome.skipped:
            count_skip(
                self.progress,
                self.spec.non_finite_loss,
                self.spec.max_skipped_steps,
                self.session.run_dir / BAD_BATCHES_DIR,
                self.spec.section,
            )
            return
        self._tally.rows += int((batch.weight > 0).sum())
        self._tally.digest = (self._tally.digest + row_digest(batch)) % DIGEST_MODULUS
        self.window.add(outcome.losses)

    def _flush_window(self, bar: tqdm | None, rate: float | None = None) -> None:
        """Logs the means over ranks of the open window (a window cut short by the end of the
        run is marked ``partial_window``; a run resumed from that step logs it again,
        complete)."""
        if not self.window.steps:
            return
        names = sorted(self.window.sums)
        local = [self.window.sums[name] / self.window.steps for name in names]
        values = torch.tensor(local, dtype=torch.float64, device=self.session.env.device)
        dist.all_reduce(values)
        means = dict(zip(names, (values / self.session.env.world_size).tolist(), strict=True))
        self._windows.append(means)
        record: dict[str, Any] = {
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            **means,
        }
        record.update({"samples_per_s": rate} if rate is not None else {"partial_window": True})
        self.session.run_log.log(record)
        self.window = _Window()
        if bar is not None and not bar.disable:
            bar.set_postfix(
                {k: f"{v:.4f}" for k, v in means.items()}, samples_s=f"{rate or 0:,.0f}"
            )
        elif self.session.env.is_main:
            shown = " ".join(f"{name} {value:.4f}" for name, value in means.items())
            logger.info("step %d epoch %d: %s", self.progress.step, self.progress.epoch, shown)

    def _validate(self, epoch_end: bool = False, final: bool = False) -> bool:
        """Validates when due (collective); True (and ``stopped_early``) when training should
        stop for want of progress."""
        validator = self.validator
        if validator is None or not validator.due(self.progress.step, epoch_end, final):
            return False
        step = self.progress.step
        early = validator.validate(self.task.model, step, lambda: self._save(best=True))
        self.stopped_early = self.stopped_early or (early and not final)
        return early

    def _state(self) -> CheckpointState:
        """The task's parts and the loop's own: validation state, loader position, window."""
        own = CheckpointState(
            positions={
                "loader": StatePart(self.task.loader.state_dict, self.task.loader.load_state_dict),
                "window": StatePart(self.window.state_dict, self.window.load_state_dict),
            }
        )
        if self.validator is not None:
            state = self.validator.state
            own.shared["validation"] = tensor_part(state.to_tensor, state.load)
        return self.task.checkpoint_state().merged(own)

    def _global_progress(self) -> Progress:
        """Progress over all ranks and the whole run (collective)."""
        tally = torch.tensor(
            [self._tally.rows, self._tally.digest],
            dtype=torch.int64,
            device=self.session.env.device,
        )
        dist.all_reduce(tally)
        return replace(
            self.progress,
            rows=self._base.rows + int(tally[0]),
            row_digest=(self._base.row_digest + int(tally[1])) % DIGEST_MODULUS,
        )

    def _save(self, best: bool = False) -> Path:
        """Collective checkpoint at the current step (``best``: as the best validation
        checkpoint), the open logging window included."""
        meta = {"config": to_dict(self.session.config), **self.task.meta()}
        return self.checkpointer.save(self._state(), self._global_progress(), meta, best=best)

    def _final_save(self) -> Path:
        """The end's checkpoint (unless the last step was just saved), then the last window."""
        self.checkpointer.finish()
        latest = self.checkpointer.latest()
        if latest is not None and latest.name == f"step-{self.progress.step}":
            checkpoint = latest
        else:
            checkpoint = self._save()
        self.checkpointer.finish()
        self._flush_window(None)
        return checkpoint

    def _finished(self) -> bool:
        return self.spec.max_steps is not None and self.progress.step >= self.spec.max_steps
