"""``twotower launch local --nproc N CONFIG``: torchrun on this machine (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from trainer.runtime.threads import ThreadChoice, choose_threads, thread_environment, usable_cores

logger = logging.getLogger(__name__)


def torchrun_command(
    nproc: int,
    config: str,
    overrides: list[str],
    max_restarts: int = 0,
    module: str = "trainer.train",
) -> list[str]:
    """``module`` is the entry point each rank runs (``trainer.ranker_train`` for the ranker)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max_restarts={max_restarts}",
        "-m",
        module,
        config,
        *overrides,
    ]


def local_threads(nproc: int, threads_per_rank: int | None = None) -> ThreadChoice:
    """Threads per rank of ``nproc`` ranks on this machine: ``threads_per_rank``, else this
    process's cores / ``nproc`` (at least 1).

    Raises:
        ValueError: naming ``--nproc`` or ``--threads-per-rank`` when it is not >= 1.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return choose_threads(usable_cores(), nproc, override=threads_per_rank)


def launch_local(
    nproc: int,
    config: str,
    overrides: list[str],
    max_restarts: int = 0,
    module: str = "trainer.train",
    threads_per_rank: int | None = None,
) -> int:
    """Runs the trainer under torchrun and returns its exit status.

    Args:
        threads_per_rank: intra-op and inter-op threads of each rank (``--threads-per-rank``);
            None for this machine's cores / ``nproc``.
    """
    threads = local_threads(nproc, threads_per_rank)
    logger.info("%d rank(s), %d thread(s) each (%s)", nproc, threads.threads, threads.source)
    # torchrun keeps an OMP_NUM_THREADS it finds instead of forcing 1 per rank.
    environment = {**os.environ, **thread_environment(threads)}
    command = torchrun_command(nproc, config, overrides, max_restarts, module)
    return subprocess.call(command, env=environment)
