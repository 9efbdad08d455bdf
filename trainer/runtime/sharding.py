"""TorchRec planning and ``DistributedModelParallel`` wrapping, shared by CPU/gloo and GPU/NCCL.

Embedding tables get a fused optimizer applied inside backward (FBGEMM), chosen before sharding;
the planner picks a sharding per table among the allowed types on the real topology: how many
ranks share a host (so table-row-wise shards stay on one host's fast links), each device's
memory and the bandwidths within and between hosts (``cluster_topology``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from config import ConfigError, ShardingConfig, ShardingType, SparseOptimizer

logger = logging.getLogger(__name__)

_GPU_ONLY = {ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE}


_SPARSE_OPTIMIZERS: dict[SparseOptimizer, type[torch.optim.Optimizer]] = {
    SparseOptimizer.ROWWISE_ADAGRAD: RowWiseAdagrad,
    SparseOptimizer.ADAGRAD: torch.optim.Adagrad,
    SparseOptimizer.ADAM: torch.optim.Adam,
    SparseOptimizer.SGD: torch.optim.SGD,
}


def attach_sparse_optimizer(model: nn.Module, kind: SparseOptimizer, lr: float) -> None:
    """Register the fused in-backward optimizer on every embedding collection's tables."""
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection | EmbeddingCollection):
            apply_optimizer_in_backward(_SPARSE_OPTIMIZERS[kind], module.parameters(), {"lr": lr})


def allowed_sharding_types(config: ShardingConfig, device: torch.device) -> list[str]:
    allowed = [t for t in config.sharding_types if device.type == "cuda" or t not in _GPU_ONLY]
    if not allowed:
        raise ValueError(
            "config key 'sharding.sharding_types': none of "
            f"{[t.value for t in config.sharding_types]} is available on {device.type}"
        )
    return [t.value for t in allowed]


def plan_sharding(
    model: nn.Module,
    config: ShardingConfig,
    device: torch.device,
    world_size: int,
    env: Mapping[str, str] = os.environ,
) -> ShardingPlan:
    """A collective plan (all ranks agree) over the real topology."""
    planner = EmbeddingShardingPlanner(
        topology=cluster_topology(config, device, world_size, env),
        constraints=table_constraints(model, allowed_sharding_types(config, device)),
    )
    return planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)


def table_constraints(
    model: nn.Module, sharding_types: list[str]
) -> dict[str, ParameterConstraints]:
    """The same allowed sharding types for every table of every embedding collection."""
    constraints = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for table in module.embedding_bag_configs():
                constraints[table.name] = ParameterConstraints(sharding_types=sharding_types)
        if isinstance(module, EmbeddingCollection):
            for sequence_table in module.embedding_configs():
                constraints[sequence_table.name] = ParameterConstraints(
                    sharding_types=sharding_types
                )
    return constraints


_GIB = 1024**3
# TorchRec's planner counts bandwidth in bytes per millisecond.
_GIB_PER_S = _GIB / 1000


def cluster_topology(
    config: ShardingConfig,
    device: torch.device,
    world_size: int,
    env: Mapping[str, str] = os.environ,
) -> Topology:
    """The planner's view of the cluster: ``world_size`` ranks on hosts of
    ``local_world_size`` ranks each, with per-device memory and intra/inter-host bandwidth.

    A key set in ``config`` wins; ``local_world_size`` null comes from the launcher (``env``),
    the others null keep TorchRec's defaults. Logs the chosen topology at INFO.

    Raises:
        ConfigError: ``sharding.local_world_size`` does not divide ``world_size``.
        ValueError: naming the launcher variable that is malformed or does not divide
            ``world_size``.
    """
    ranks_per_host, source = local_world_size(config, world_size, env)
    # TopologyFactory reads the HardwareConfig bandwidths only with use_hardware_based_bandwidth;
    # without it, it silently keeps TorchRec's defaults.
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=ranks_per_host,
            hbm_cap_bytes=_bytes(config.hbm_cap_gib),
            ddr_cap_bytes=_bytes(config.ddr_cap_gib),
        ),
        hardware_config=HardwareConfig(
            intra_host_bw=_bandwidth(config.intra_host_bw_gib_per_s),
            inter_host_bw=_bandwidth(config.inter_host_bw_gib_per_s),
        ),
        kernel_config=KernelConfig(compute_device=device.type, use_hardware_based_bandwidth=True),
    )
    storage = topology.devices[0].storage
    logger.info(
        "planner topology: %d rank(s) = %d host(s) x %d (%s), %s; HBM %.1f GiB/device, "
        "DDR %.1f GiB/rank, bandwidth %.1f GiB/s within a host, %.1f GiB/s between hosts",
        world_size,
        world_size // ranks_per_host,
        ranks_per_host,
        source,
        topology.compute_device,
        storage.hbm / _GIB,
        storage.ddr / _GIB,
        topology.intra_host_bw / _GIB_PER_S,
        topology.inter_host_bw / _GIB_PER_S,
    )
    return topology


def _bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * _GIB)


def _bandwidth(gib_per_s: float | None) -> float | None:
    return None if gib_per_s is None else gib_per_s * _GIB_PER_S


def local_world_size(
    config: ShardingConfig, world_size: int, env: Mapping[str, str] = os.environ
) -> tuple[int, str]:
    """Ranks per host and where that number came from: ``sharding.local_world_size``, else
    ``LOCAL_WORLD_SIZE`` (torchrun), else ``SLURM_NTASKS_PER_NODE``, else
    ``SLURM_TASKS_PER_NODE`` (``8(x4)``), else every rank on one host.

    A launcher count above ``world_size`` (a single process inside a larger allocation) means
    one host; config values are taken as given.

    Raises:
        ConfigError: ``sharding.local_world_size`` does not divide ``world_size``.
        ValueError: naming the variable that is malformed or does not divide ``world_size``.
    """
    if config.local_world_size is not None:
        if world_size % config.local_world_size:
            raise ConfigError(
                f"config key 'sharding.local_world_size': {config.local_world_size} ranks per "
                f"host must divide the world size {world_size}"
            )
        return config.local_world_size, "sharding.local_world_size"
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = env.get(name, "")
        if not raw:
            continue
        count = _tasks_per_node(name, raw)
        if count > world_size:
            return world_size, f"{name}={raw} exceeds the world size: one host"
        if world_size % count:
            raise ValueError(
                f"{name}={raw}: {count} ranks per host must divide the world size {world_size}; "
                "set sharding.local_world_size to override"
            )
        return count, f"{name}={raw}"
    return world_size, "no launcher setting: one host"


# One entry of SLURM's compressed per-node counts: "8" or "8(x4)" (8 tasks on each of 4 nodes).
_SLURM_COUNT = re.compile(r"(\d+)(?:\(x\d+\))?")


def _tasks_per_node(name: str, raw: str) -> int:
    """The one per-host rank count in ``raw``; SLURM lists one per node group (``2(x3),1``)."""
    counts = set()
    for entry in raw.split(","):
        match = _SLURM_COUNT.fullmatch(entry.strip())
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"{name}={raw!r}: expected counts >= 1 such as '8' or '8(x4)'")
        counts.add(int(match.group(1)))
    if len(counts) > 1:
        raise ValueError(
            f"{name}={raw!r}: hosts run different numbers of ranks {sorted(counts)}; the planner "
            "needs one, set sharding.local_world_size"
        )
    return counts.pop()


def sharders() -> list[ModuleSharder[nn.Module]]:
    """Pooled (EmbeddingBagCollection) and sequence (EmbeddingCollection) tables."""
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def shard_model(
    model: nn.Module, config: ShardingConfig, device: torch.device, world_size: int
) -> DistributedModelParallel:
    plan = plan_sharding(model, config, device, world_size)
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders())
