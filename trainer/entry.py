"""The shared ``python -m trainer.<job> CONFIG [key=value ...]`` entry point of every job
(training, ranker training, alignment): parse, log, run collectively, always shut down."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from trainer.config import ExperimentConfig, load_config
from trainer.distributed import shutdown
from trainer.logs import configure_logging

logger = logging.getLogger(__name__)


def run_job(
    module: str,
    job: Callable[[ExperimentConfig], Any],
    argv: list[str] | None = None,
    exit_code: Callable[[Any], int] = lambda result: 0,
) -> int:
    """Runs ``job(config)`` in this process's group; returns ``exit_code(result)`` (2: usage)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(f"usage: python -m {module} CONFIG [key=value ...]", file=sys.stderr)
        return 2
    configure_logging()
    config = load_config(args[0], args[1:])
    try:
        result = job(config)
        if dist.get_rank() == 0:
            logger.info("done: %s", result)
    finally:
        shutdown()
    return exit_code(result)
