"""TorchRec planning and ``DistributedModelParallel`` wrapping, shared by CPU/gloo and GPU/NCCL.

Embedding tables get a fused optimizer applied inside backward (FBGEMM), chosen before sharding;
the planner picks a sharding per table among the allowed types on the real topology.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from config import ShardingConfig, ShardingType, SparseOptimizer

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
    model: nn.Module, config: ShardingConfig, device: torch.device, world_size: int
) -> ShardingPlan:
    """A collective plan (all ranks agree) over the real topology."""
    sharding_types = allowed_sharding_types(config, device)
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
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type),
        constraints=constraints,
    )
    return planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)


def sharders() -> list[ModuleSharder[nn.Module]]:
    """Pooled (EmbeddingBagCollection) and sequence (EmbeddingCollection) tables."""
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def shard_model(
    model: nn.Module, config: ShardingConfig, device: torch.device, world_size: int
) -> DistributedModelParallel:
    plan = plan_sharding(model, config, device, world_size)
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders())
