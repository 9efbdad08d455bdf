"""Training throughput by launcher: the same 2-rank MovieLens-100k run under
``twotower launch local`` (torchrun) and under ``twotower launch slurm`` (submitit), side by side.

    python -m bench.launchers [--data data/ml-100k] [--steps 300] [--ranks 2]
        [--threads-per-rank N] [--partition P] [key=value ...]

Each run goes through the ``twotower`` command line as a user would start it, with each
launcher's own threads per rank unless ``--threads-per-rank`` sets both. samples/s is read from
each run's metrics log, skipping the first logging window (warm-up); the threads column is what
rank 0 logged at start. The SLURM run needs a cluster whose nodes see this machine's files (on
one machine: ``bash launch/slurm_local_cluster.sh``, as root); without ``sinfo`` it is left out.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import logged_samples_per_second, training_only_overrides
from bench.table import print_table

COLUMNS = ["launcher", "ranks", "threads per rank", "samples/s", "ratio vs local"]
CLI = [sys.executable, "-m", "launch.cli"]
# Rank 0's start-up line (trainer.runtime.distributed.apply_threads).
THREADS_LINE = re.compile(r"threads per rank: (\d+) intra-op, \d+ inter-op \(([^)]*)\)")
SUBMITTED = re.compile(r"submitted SLURM job (\d+)")


def logged_threads(log: str) -> str:
    """``"8 (16 cores / 2 ranks per node)"`` from rank 0's log, ``"?"`` when it has none."""
    found = THREADS_LINE.search(log)
    return f"{found.group(1)} ({found.group(2)})" if found else "?"


def _threads_flag(threads_per_rank: int | None) -> list[str]:
    return [] if threads_per_rank is None else ["--threads-per-rank", str(threads_per_rank)]


def run_local(
    config: str, overrides: list[str], ranks: int, threads_per_rank: int | None, run_dir: Path
) -> dict:
    """``twotower launch local --nproc ranks``; the row of the table."""
    command = [*CLI, "launch", "local", "--nproc", str(ranks), *_threads_flag(threads_per_rank)]
    log = run_dir / "launch.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    # A file, not a pipe: loader worker processes can outlive the run and hold a pipe open.
    with log.open("w") as out:
        code = subprocess.run([*command, config, *overrides], stdout=out, stderr=out).returncode
    if code != 0:
        raise RuntimeError(f"twotower launch local exited {code}:\n{log.read_text()[-3000:]}")
    return {
        "launcher": "twotower launch local",
        "ranks": ranks,
        "threads per rank": logged_threads(log.read_text()),
        "samples/s": logged_samples_per_second(run_dir),
    }


def run_slurm(
    config: str,
    overrides: list[str],
    ranks: int,
    threads_per_rank: int | None,
    run_dir: Path,
    partition: str | None,
    timeout_s: float,
) -> dict:
    """``twotower launch slurm --nodes 1 --cpu-ranks ranks``, waited for with ``squeue``; the
    row of the table."""
    command = [*CLI, "launch", "slurm", "--nodes", "1", "--cpu-ranks", str(ranks)]
    command += [*_threads_flag(threads_per_rank), "--job-name", "twotower-bench"]
    command += ["--partition", partition] if partition else []
    submitted = subprocess.run(
        [*command, config, *overrides], capture_output=True, text=True, timeout=300
    )
    job = SUBMITTED.search(submitted.stdout)
    if submitted.returncode != 0 or job is None:
        raise RuntimeError(f"twotower launch slurm failed:\n{submitted.stderr[-3000:]}")
    job_id = job.group(1)
    _wait_for(job_id, timeout_s)
    rank_log = run_dir / "slurm" / f"{job_id}_0_log.err"
    log = rank_log.read_text() if rank_log.exists() else ""
    if not (run_dir / "train_summary.json").exists():
        raise RuntimeError(f"SLURM job {job_id} left no train_summary.json:\n{log[-3000:]}")
    return {
        "launcher": "twotower launch slurm",
        "ranks": ranks,
        "threads per rank": logged_threads(log),
        "samples/s": logged_samples_per_second(run_dir),
    }


def _wait_for(job_id: str, timeout_s: float) -> None:
    """Until the job leaves the queue (``squeue``: the test cluster keeps no accounting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
        if queued.returncode != 0 or not queued.stdout.strip():
            return
        time.sleep(2)
    subprocess.run(["scancel", job_id], check=False)
    raise RuntimeError(f"SLURM job {job_id} still queued after {timeout_s:.0f}s; cancelled")


def run(
    config: str,
    data: str,
    steps: int,
    ranks: int = 2,
    threads_per_rank: int | None = None,
    extra: list[str] | None = None,
    partition: str | None = None,
    timeout_s: float = 1800,
) -> list[dict]:
    """One row per launcher (SLURM's only where ``sinfo`` exists), keyed by ``COLUMNS``."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="twotower-launchers-") as root:
        local_dir, slurm_dir = Path(root, "local"), Path(root, "slurm")
        data = str(Path(data).absolute())  # the SLURM tasks may start elsewhere
        local = training_only_overrides(data, local_dir, steps, extra or [])
        rows.append(run_local(config, local, ranks, threads_per_rank, local_dir))
        if shutil.which("sinfo") is not None:
            slurm = training_only_overrides(data, slurm_dir, steps, extra or [])
            rows.append(
                run_slurm(config, slurm, ranks, threads_per_rank, slurm_dir, partition, timeout_s)
            )
    for row in rows:
        row["ratio vs local"] = row["samples/s"] / rows[0]["samples/s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/movielens_100k.yaml")
    parser.add_argument("--data", default="data/ml-100k")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of each run")
    parser.add_argument(
        "--threads-per-rank", type=int, default=None, help="both launchers (default: their own)"
    )
    parser.add_argument(
        "--partition", default=None, help="SLURM partition (default: the cluster's)"
    )
    parser.add_argument("--timeout-s", type=float, default=1800, help="most seconds in the queue")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    if not Path(args.data, "manifest.json").exists():
        raise SystemExit(
            f"{args.data}: prepare it first (twotower prepare movielens --variant 100k "
            f"--out {args.data})"
        )
    if shutil.which("sinfo") is None:
        print("no sinfo on this machine: the SLURM row is left out", file=sys.stderr)
    rows = run(
        args.config,
        args.data,
        args.steps,
        args.ranks,
        args.threads_per_rank,
        args.overrides,
        args.partition,
        args.timeout_s,
    )
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
