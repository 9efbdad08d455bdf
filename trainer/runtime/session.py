"""One job's process as the training loop sees it: rank, run directory, stop signals, run log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from config import ExperimentConfig, to_dict, to_yaml
from trainer.runtime.distributed import DistributedEnv, init_distributed, seed_everything
from trainer.runtime.run_files import BAD_BATCHES_DIR, CONFIG_FILE
from trainer.runtime.run_logger import RunLogger
from trainer.runtime.signals import StopSignals
from trainer.runtime.step_guard import StepGuard


@dataclass
class Session:
    """One job's process: its rank, run directory, stop signals and run log.

    Args:
        config: the resolved configuration (written to ``<run.dir>/config.yaml``).
        env: this rank.
        run_dir: the run directory.
        stop: the signals that save and stop (``checkpoint.signals``).
        run_log: metrics.jsonl and wandb (main rank only).
    """

    config: ExperimentConfig
    env: DistributedEnv
    run_dir: Path
    stop: StopSignals
    run_log: RunLogger

    @classmethod
    def open(cls, config: ExperimentConfig) -> Session:
        """Joins the process group, seeds, writes the run's config; collective."""
        env = init_distributed()
        seed_everything(config.seed)
        run_dir = Path(config.run.dir)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG_FILE).write_text(to_yaml(config))
        dist.barrier()
        logging_config = config.logging
        run_log = RunLogger(
            run_dir,
            env.is_main,
            logging_config.wandb,
            logging_config.wandb_project,
            config.run.name,
            to_dict(config),
        )
        return cls(config, env, run_dir, StopSignals(config.checkpoint.signals), run_log)

    def guard(self) -> StepGuard:
        """The pre-update vote of a task's step (bad batches saved under the run)."""
        return StepGuard(self.env, self.stop, self.run_dir / BAD_BATCHES_DIR)

    def close(self) -> None:
        self.stop.close()
        self.run_log.close()
