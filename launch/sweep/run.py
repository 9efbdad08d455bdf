"""Running a sweep: each planned run in a subprocess (torchrun for several ranks), its outcome
read back, the tables rewritten after every run."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from config import ConfigError
from launch.local import torchrun_command
from launch.sweep.plan import PlannedRun, RunOutcome, RunStatus, plan_sweep
from launch.sweep.report import results_table, write_results
from launch.sweep.spec import load_sweep
from trainer.runtime.checkpoint import checkpoints_root

logger = logging.getLogger(__name__)

# "[rank0]: data_pipeline.schema.SchemaError: ..." or "ValueError: ..." in a traceback.
EXCEPTION_LINE = re.compile(r"(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt|Exit)\b.*:")


def train_command(run: PlannedRun, nproc: int) -> list[str]:
    """The trainer's command line: a bare process for 1 rank, torchrun for more."""
    if nproc == 1:
        return [sys.executable, "-m", run.module, run.config, *run.overrides]
    return torchrun_command(nproc, run.config, list(run.overrides), module=run.module)


def execute(run: PlannedRun, nproc: int) -> RunOutcome:
    """Train one run in a subprocess (output to its train.log) and read what it wrote."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    # A result left by an earlier sweep must not pass for this run's, and its checkpoints must
    # not be resumed: the variant's config (or the data) may have changed since.
    for stale in (run.metrics_file, run.summary_file):
        (run.run_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(checkpoints_root(run.run_dir), ignore_errors=True)
    command = train_command(run, nproc)
    start = time.perf_counter()
    with run.log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    outcome = RunOutcome(run, RunStatus.OK, returncode, time.perf_counter() - start, command)
    metrics_path, summary_path = run.run_dir / run.metrics_file, run.run_dir / run.summary_file
    outcome.failure_line = failure_line(run.log_path.read_text(errors="replace"))
    if returncode != 0:
        outcome.status, outcome.error = RunStatus.FAILED, f"exit code {returncode}"
    elif not metrics_path.exists():
        outcome.status, outcome.error = RunStatus.FAILED, f"no {run.metrics_file} written"
    else:
        outcome.metrics = json.loads(metrics_path.read_text())
        if summary_path.exists():
            outcome.summary = json.loads(summary_path.read_text())
        else:
            logger.warning("%s: no %s; samples/s left empty", run.run_dir, run.summary_file)
    return outcome


def failure_line(log: str) -> str:
    """The log's last exception line (``SchemaError: ... no manifest``), else its last line;
    torchrun ends its logs with a summary banner, so the last line alone says little."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        # torchrun's own ChildFailedError only says that a rank failed; the rank says why.
        if EXCEPTION_LINE.match(line) and "ChildFailedError" not in line:
            return line
    return lines[-1] if lines else ""


@dataclass
class SweepReport:
    """The experiment's title, per dataset its markdown table, and the failed-run count."""

    title: str
    tables: dict[str, str]
    runs: int
    failed: int


def run_sweep(
    path: str | Path,
    datasets: Sequence[str] | None = None,
    nproc: int = 1,
    only: Sequence[str] | None = None,
) -> SweepReport:
    """Validate every run of the experiment file, then train them one after another."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    spec = load_sweep(path)
    runs = plan_sweep(spec, datasets, only)
    logger.info("sweep '%s': %d runs validated, writing to %s", spec.title, len(runs), spec.out)
    by_dataset: dict[str, list[RunOutcome]] = {}
    for number, run in enumerate(runs, start=1):
        logger.info(
            "[%d/%d] %s / %s (log: %s)", number, len(runs), run.dataset, run.variant, run.log_path
        )
        outcome = execute(run, nproc)
        if outcome.status is RunStatus.OK:
            logger.info("[%d/%d] done in %.0f s", number, len(runs), outcome.seconds)
        else:
            logger.error(
                "[%d/%d] failed (%s): %s\n  see %s",
                number,
                len(runs),
                outcome.error,
                outcome.failure_line,
                run.log_path,
            )
        outcomes = by_dataset.setdefault(run.dataset, [])
        outcomes.append(outcome)
        write_results(Path(spec.out) / run.dataset, spec.title, outcomes)
    tables = {name: results_table(outcomes) for name, outcomes in by_dataset.items()}
    failed = sum(o.status is RunStatus.FAILED for group in by_dataset.values() for o in group)
    return SweepReport(spec.title, tables, len(runs), failed)
