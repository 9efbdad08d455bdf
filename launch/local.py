"""``twotower launch local --nproc N CONFIG``: torchrun on this machine (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import subprocess
import sys


def torchrun_command(
    nproc: int,
    config: str,
    overrides: list[str],
    max_restarts: int = 0,
    module: str = "trainer.train",
) -> list[str]:
    """``module`` is the entry point torchrun starts (the benchmark's baseline has its own)."""
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


def launch_local(nproc: int, config: str, overrides: list[str], max_restarts: int = 0) -> int:
    """Runs the trainer under torchrun and returns its exit status."""
    return subprocess.call(torchrun_command(nproc, config, overrides, max_restarts))
