"""Run a test function on N gloo ranks in spawned processes (TorchRec-style, CPU only).

Usage::

    def _all_reduce_sum(rank: int, world_size: int, scale: float) -> torch.Tensor:
        value = torch.tensor([float(rank) * scale])
        dist.all_reduce(value)
        return value  # anything torch.save can write

    def test_all_reduce() -> None:
        results = run_distributed(_all_reduce_sum, 2, 3.0)  # one result per rank
        assert [float(r) for r in results] == [3.0, 3.0]

``fn`` must be defined at module top level (spawn pickles it by name). Each rank runs with one
intra-op thread, deterministic algorithms and the launcher variables (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set, so code calling ``trainer.runtime.distributed.init_distributed``
joins the group already created. A failing or hanging rank fails the caller with every failing
rank's traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.runtime.distributed import free_port


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout_s: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    Args:
        fn: top-level function; its return value must be picklable by torch.save.
        world_size: number of processes (keep it at 2, at most 4: tests share a few cores).
        args: extra positional arguments passed to every rank.
        timeout_s: wall-clock limit for all ranks together.
    Returns:
        [world_size] return values, in rank order.
    Raises:
        RuntimeError: a rank raised or died; the message holds each failing rank's traceback.
        TimeoutError: the ranks did not all finish within ``timeout_s``.
    """
    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as folder:
        # Not daemonic: ranks may start data-loader workers of their own.
        processes = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, port, folder, args))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        _join_all(processes, timeout_s)
        outcomes = [_read_outcome(Path(folder), rank) for rank in range(world_size)]
    failures = [
        f"rank {rank} (exit code {process.exitcode}):\n{outcome.get('error', 'no traceback')}"
        for rank, (process, outcome) in enumerate(zip(processes, outcomes))
        if process.exitcode != 0 or "error" in outcome
    ]
    if failures:
        raise RuntimeError("distributed test failed\n" + "\n".join(failures))
    return [outcome["result"] for outcome in outcomes]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    folder: str,
    args: tuple[Any, ...],
) -> None:
    """Child process body: set up the group, run fn, save its result or traceback."""
    # The usual launcher variables too, so code that reads the environment sees this rank.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    outcome: dict[str, Any] = {}
    try:
        init_method = f"tcp://127.0.0.1:{port}"
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        try:
            outcome["result"] = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:  # every failure, SystemExit included, must reach the parent test
        outcome = {"error": traceback.format_exc()}
    torch.save(outcome, Path(folder) / f"rank{rank}.pt")
    # Leave without interpreter teardown once the outcome is on disk: a rank that finished its
    # work has intermittently aborted in teardown ("terminate called without an active
    # exception", exit -6), which would fail a test whose ranks all succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if "error" in outcome else 0)


def _join_all(processes: list[Any], timeout_s: float) -> None:
    """Wait for every process; on timeout or a crashed rank, stop the rest."""
    deadline = time.monotonic() + timeout_s
    while any(process.is_alive() for process in processes):
        crashed = any(p.exitcode not in (None, 0) for p in processes)
        if crashed or time.monotonic() > deadline:
            # A crashed rank leaves its peers blocked in a collective: give them a moment.
            grace = time.monotonic() + 10.0
            while crashed and time.monotonic() < grace and any(p.is_alive() for p in processes):
                time.sleep(0.1)
            for process in processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5.0)
            if not crashed:
                raise TimeoutError(f"distributed test exceeded {timeout_s} s")
            return
        time.sleep(0.05)
    for process in processes:
        process.join()


def _read_outcome(folder: Path, rank: int) -> dict[str, Any]:
    path = folder / f"rank{rank}.pt"
    if not path.exists():
        return {"error": "rank exited without reporting (killed or crashed)"}
    return torch.load(path, weights_only=False)
