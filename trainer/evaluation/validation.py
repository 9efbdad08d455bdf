"""Validation during training: the valid split evaluated every ``eval.every_n_steps`` steps
and/or at each epoch's end, the best checkpoint by ``eval.early_stopping.metric`` kept, and
early stopping after ``patience`` validations without a gain.

A configuration is then chosen on validation and reported on test: the final evaluation (and
``twotower eval`` / ``export`` / alignment starting from the run) uses the best checkpoint.
Validation runs the same exact evaluation as the final one, without bootstrap intervals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from config import ConfigError, ExperimentConfig
from data_pipeline.manifest import Manifest
from trainer.evaluation.evaluate import cutoffs_for, evaluate_model
from trainer.evaluation.intervals import BootstrapConfig
from trainer.features import ResolvedFeatures
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.run_logger import RunLogger

logger = logging.getLogger(__name__)


def enabled(config: ExperimentConfig) -> bool:
    return config.eval.every_n_steps is not None or config.eval.every_epoch


def check_metric(config: ExperimentConfig, manifest: Manifest) -> None:
    """The selection metric must be one the evaluation reports, on a split the data has."""
    if config.eval.valid_split not in manifest.splits:
        raise ConfigError(
            f"config key 'eval.valid_split': the data has no split {config.eval.valid_split!r} "
            f"(has {sorted(manifest.splits)})"
        )
    cutoffs = cutoffs_for(config.eval.ks)
    names = [f"hr@{k}" for k in cutoffs.hit_rate]
    names += [f"recall@{k}" for k in cutoffs.recall] + [f"ndcg@{k}" for k in cutoffs.ndcg]
    names.append(f"mrr@{max(config.eval.ks)}")
    if config.eval.early_stopping.metric not in names:
        raise ConfigError(
            f"config key 'eval.early_stopping.metric': {config.eval.early_stopping.metric!r} is "
            f"not reported under eval.ks={list(config.eval.ks)} (choose from {names})"
        )


@dataclass
class ValidationState:
    """Replicated and checkpointed: the best value so far, its step, and the validations since
    it (``best`` is -inf before the first validation)."""

    best: float = -math.inf
    best_step: int = -1
    rounds_without_gain: int = 0
    last_step: int = -1  # the step last validated (no second validation of one step)

    def to_tensor(self) -> torch.Tensor:
        values = [self.best, self.best_step, self.rounds_without_gain, self.last_step]
        return torch.tensor(values, dtype=torch.float64)

    def load(self, tensor: torch.Tensor) -> None:
        best, best_step, rounds, last = tensor.tolist()
        self.best, self.best_step = best, int(best_step)
        self.rounds_without_gain, self.last_step = int(rounds), int(last)


@dataclass
class Validator:
    """Validates one run. ``save_best`` writes the best checkpoint (collective)."""

    config: ExperimentConfig
    manifest: Manifest
    env: DistributedEnv
    run_log: RunLogger
    state: ValidationState
    features: ResolvedFeatures | None = None  # the job's resolved features

    def due(self, step: int, epoch_end: bool, final: bool = False) -> bool:
        """Every N steps, at an epoch's end, or ``final``; never twice for one step."""
        every = self.config.eval.every_n_steps
        if step == self.state.last_step or step == 0:
            return False
        return (
            final
            or (every is not None and step % every == 0)
            or (epoch_end and self.config.eval.every_epoch)
        )

    def validate(self, model: torch.nn.Module, step: int, save_best: Callable[[], object]) -> bool:
        """Evaluates the valid split (collective); keeps the best; True when training should
        stop early."""
        results = evaluate_model(
            model,
            self.manifest,
            self.config,
            self.env,
            None,
            self.config.eval.valid_split,
            bootstrap=BootstrapConfig(replicates=0),
            features=self.features,
        )
        stopping = self.config.eval.early_stopping
        value = float(results["model"][stopping.metric])
        self.state.last_step = step
        improved = value > self.state.best + stopping.min_delta
        if improved:
            self.state.best, self.state.best_step = value, step
            self.state.rounds_without_gain = 0
            save_best()
        else:
            self.state.rounds_without_gain += 1
        self.run_log.log(
            {
                "step": step,
                **{f"valid/{k}": v for k, v in results["model"].items()},
                "valid/best": self.state.best,
                "valid/best_step": self.state.best_step,
            }
        )
        stop = stopping.patience is not None and self.state.rounds_without_gain >= stopping.patience
        if self.env.is_main:
            logger.info(
                "validation at step %d: %s %.4f (best %.4f at step %d)%s",
                step,
                stopping.metric,
                value,
                self.state.best,
                self.state.best_step,
                f"; stopping early after {stopping.patience} without a gain" if stop else "",
            )
        return stop
