"""The shared ``python -m trainer.<job> CONFIG [key=value ...]`` entry point of every job
(training, ranker training, alignment): parse, log, run collectively, always shut down."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from config import ExperimentConfig, load_config
from trainer.runtime.distributed import shutdown
from trainer.runtime.logs import configure_logging

logger = logging.getLogger(__name__)


def run_job(
    module: str,
    job: Callable[[ExperimentConfig], Any],
    argv: list[str] | None = None,
    exit_code: Callable[[Any], int] = lambda result: 0,
) -> int:
    """Runs ``job(config)`` in this process's group; returns ``exit_code(result)`` (2: usage)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=_first_line(sys.modules.get(module) or sys.modules.get("__main__")),
        epilog="Run under torchrun for several ranks (twotower launch local).",
    )
    parser.add_argument("config", help="experiment config (YAML), e.g. configs/movielens_100k.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=5"
    )
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # --help (0) or a usage error (2)
        return int(stop.code or 0)
    configure_logging()
    config = load_config(args.config, args.overrides)
    try:
        result = job(config)
        if dist.get_rank() == 0:
            logger.info("done: %s", result)
    finally:
        shutdown()
    return exit_code(result)


def _first_line(module: Any) -> str | None:
    """The first line of a job module's docstring: what ``--help`` says the job does."""
    doc = getattr(module, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else None
