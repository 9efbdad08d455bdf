"""Process group and device from the environment: one code path for 1 and N ranks, CPU and GPU.

Under torchrun / SLURM the usual variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) are set; a bare ``python`` run becomes a distributed run of size 1. Joining the
group is also where a process takes its threads per rank (``trainer.runtime.threads``).
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from trainer.runtime.threads import ThreadChoice, rank_threads, usable_cores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TIMEOUT_ENV = "TWOTOWER_DIST_TIMEOUT_S"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed() -> DistributedEnv:
    """Join (or create, for a bare single process) the default process group; an already
    initialized group (tests, notebooks) is used as it is."""
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        on_gpu = dist.get_backend() == "nccl"
        device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        return DistributedEnv(rank, world_size, local_rank, device, str(dist.get_backend()))
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ["RANK"]) if launched else 0
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    apply_threads(rank)
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = collective_timeout()
    store = elastic_attempt_store(rank, world_size, timeout) if launched else None
    # A bare process gets a private rendezvous instead of inheriting (or setting) env variables.
    init_method = None if store else "env://" if launched else f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    return DistributedEnv(rank, world_size, local_rank, device, backend)


def apply_threads(rank: int) -> ThreadChoice:
    """Sets this process's intra-op and inter-op threads to its launcher's choice (or the same
    choice made here); rank 0 logs it. Called before the job's first parallel work.

    Raises:
        ValueError: naming the variable (``TWOTOWER_THREADS_PER_RANK``, ...) that is not an
            integer >= 1.
    """
    choice = rank_threads(os.environ, usable_cores())
    torch.set_num_threads(choice.threads)
    if torch.get_num_interop_threads() != choice.threads:
        try:
            torch.set_num_interop_threads(choice.threads)
        except RuntimeError:
            # torch fixes the inter-op pool at its first use; a process that already ran
            # parallel work (a notebook, a test session) keeps the pool it has.
            pass
    if rank == 0:
        logger.info(
            "threads per rank: %d intra-op, %d inter-op (%s)",
            torch.get_num_threads(),
            torch.get_num_interop_threads(),
            choice.source,
        )
    return choice


def elastic_attempt_store(
    rank: int, world_size: int, timeout: timedelta | None
) -> dist.Store | None:
    """Under torchelastic (``TORCHELASTIC_RESTART_COUNT`` set): the rendezvous store with keys
    prefixed by the restart attempt, else None (plain ``env://``).

    The agent's store outlives a restart, and gloo's keys (each rank's address) do not change
    between attempts: a restarted rank could read the address of a peer killed in the previous
    attempt and fail with "connection refused" on every restart (seen in the elastic test).
    Same server as ``env://`` (the agent's, or rank 0's), fresh keys per attempt.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=not agent_store and rank == 0,
        timeout=timeout or timedelta(minutes=30),
        multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"twotower/attempt_{attempt}", store)


def collective_timeout() -> timedelta | None:
    """``TWOTOWER_DIST_TIMEOUT_S``: bound on joining the group and on every collective (None:
    torch's default, 30 min for gloo). A rank stuck connecting to a peer of an earlier elastic
    attempt then fails and the agent restarts the group instead of waiting that long.

    Raises:
        ValueError: naming the variable when it is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError as error:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: not a number of seconds") from error
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be > 0")
    return timedelta(seconds=seconds)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical dense initialization everywhere."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def any_rank_has(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (:func:`any_rank_has_each` of one flag)."""
    return any_rank_has_each([flag], device)[0]


def any_rank_has_each(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """Whether each flag holds on any rank: one small all-reduce (none for a single rank)."""
    if dist.get_world_size() == 1:
        return list(flags)
    value = torch.tensor([int(flag) for flag in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
