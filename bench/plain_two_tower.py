"""A plain-PyTorch two-tower, the baseline the TorchRec trainer is benchmarked against.

The trainer's own :class:`models.two_tower.TwoTowerModel` (towers, temperature, forward) over a
plain-PyTorch sparse part: one ``nn.EmbeddingBag`` per table (pooling, sizes and initialization
from the same table configs) instead of TorchRec collections, no history encoder. Parameter
names match the TorchRec model's state dict, so weights copy across. Trained by the trainer's own
step and loop (``trainer.runtime.loop``: same loss, logging, checkpoints, signals) with AdamW on
the dense layers and the plain-PyTorch counterpart of ``train.sparse_optimizer`` on the tables;
DDP averages every gradient across ranks.

    torchrun --nproc_per_node 2 -m bench.plain_two_tower CONFIG [key=value ...]
        [--dense-table-gradients]

With small tables (the synthetic world's are a few MiB), dense table gradients all-reduced whole
are the faster plain baseline at 2 ranks; sparse gradients are the usual choice for large tables.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec import KeyedJaggedTensor, KeyedTensor, PoolingType
from torchrec.optim.keyed import KeyedOptimizerWrapper

from config import ExperimentConfig, ModelConfig, SparseOptimizer, load_config
from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.schema import EventSchema, FeatureKind
from models.sparse_part import SparsePart
from models.towers import table_configs
from models.two_tower import TwoTowerModel
from trainer.build import label_weights, loader_spec, model_schema, model_tables
from trainer.distillation import Distillation
from trainer.evaluation.corpus import first_row_batch
from trainer.features import ResolvedFeatures, resolve_features
from trainer.negatives.negative_sampling import NegativeSampling
from trainer.runtime.distributed import DistributedEnv, shutdown
from trainer.runtime.logs import configure_logging
from trainer.runtime.loop import LoopResult, LoopSpec, TrainingLoop
from trainer.runtime.session import Session
from trainer.runtime.state import CheckpointState, StatePart, module_part, optimizer_part
from trainer.runtime.step_guard import StepGuard, StepOutcome
from trainer.step import StepContext, train_step

logger = logging.getLogger(__name__)

_MODES = {PoolingType.MEAN: "mean", PoolingType.SUM: "sum"}


class PlainEmbeddingBags(nn.Module):
    """One ``nn.EmbeddingBag`` per table; features sharing a table share its bag.

    Args:
        schema: event schema (features and the table each reads).
        tables: table name -> rows.
        config: model configuration (embedding dims).
        sparse_gradients: sparse table gradients (rows in the batch only); False gives dense
            [rows, dim] gradients, all-reduced whole by DDP.
    """

    def __init__(
        self,
        schema: EventSchema,
        tables: dict[str, int],
        config: ModelConfig,
        sparse_gradients: bool = True,
    ) -> None:
        super().__init__()
        richer = [f.name for f in schema.features if f.weighted or f.kind is FeatureKind.COUNTER]
        if richer:
            raise ValueError(
                f"the plain baseline embeds plain ids only, not {richer}: run with "
                "features.groups=[id,history,categorical]"
            )
        configs = table_configs(schema.features, tables, config.embedding_dim, config.table_dims)
        self.embedding_bags = nn.ModuleDict()
        self.feature_tables: dict[str, str] = {}
        for table in configs:
            bag = nn.EmbeddingBag(
                table.num_embeddings,
                table.embedding_dim,
                mode=_MODES[table.pooling],
                sparse=sparse_gradients,
            )
            bound = math.sqrt(1 / table.num_embeddings)  # TorchRec's default table init
            nn.init.uniform_(bag.weight, -bound, bound)
            self.embedding_bags[table.name] = bag
            self.feature_tables.update(dict.fromkeys(table.feature_names, table.name))
        self.dims = {name: c.embedding_dim for c in configs for name in c.feature_names}
        self.feature_order = [name for c in configs for name in c.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Jagged ``[sum(lengths)]`` ids per key -> pooled ``[B, d_f]`` per feature, as a
        ``KeyedTensor`` like an ``EmbeddingBagCollection``'s output."""
        jagged = features.to_dict()
        pooled = [
            # offsets without the final total: the plain (include_last_offset=False) layout
            self.embedding_bags[self.feature_tables[key]](
                jagged[key].values(), jagged[key].offsets()[:-1]
            )
            for key in self.feature_order
        ]
        return KeyedTensor.from_tensor_list(self.feature_order, pooled)


class RowWiseAdagrad(torch.optim.Optimizer):
    """FBGEMM's exact row-wise Adagrad: one accumulator per row, ``s_r += mean(g_r^2)``,
    ``w_r -= lr * g_r / (sqrt(s_r) + eps)``, for the rows of a sparse gradient (a dense
    gradient updates every row; rows with a zero gradient do not move)."""

    def __init__(self, params: list[nn.Parameter], lr: float, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    grad = param.grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows = torch.arange(param.shape[0], device=param.device)
                    values = param.grad
                state = self.state[param]
                if "sum" not in state:
                    state["sum"] = torch.zeros(param.shape[0], device=param.device)
                state["sum"].index_add_(0, rows, values.square().mean(dim=1))
                scale = group["lr"] / (state["sum"][rows].sqrt() + group["eps"])
                param.index_add_(0, rows, values * -scale.unsqueeze(1))


def table_optimizer(
    params: list[nn.Parameter], kind: SparseOptimizer, lr: float
) -> torch.optim.Optimizer:
    """The plain-PyTorch optimizer that matches the fused one (``adam``: ``SparseAdam``,
    sparse gradients only)."""
    if kind is SparseOptimizer.ROWWISE_ADAGRAD:
        return RowWiseAdagrad(params, lr)
    if kind is SparseOptimizer.ADAGRAD:
        return torch.optim.Adagrad(params, lr=lr, eps=1e-8)
    if kind is SparseOptimizer.SGD:
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.SparseAdam(params, lr=lr)


class PlainOptimizers:
    """AdamW on the dense layers and the table optimizer on the embedding bags, both torchrec
    ``KeyedOptimizerWrapper`` (state keyed by parameter name, as the trainer's), stepped
    together: the trainer's step calls ``zero_grad`` and ``step`` once each. The loop's
    learning-rate schedule drives the dense one (``param_groups``); the tables keep their rate,
    as the fused table optimizers do."""

    def __init__(self, model: nn.Module, config: ExperimentConfig) -> None:
        named = dict(model.named_parameters())
        tables = {n: p for n, p in named.items() if ".embedding_bags." in n}
        dense = {n: p for n, p in named.items() if ".embedding_bags." not in n}
        train = config.train
        self.dense = KeyedOptimizerWrapper(
            dense,
            lambda params: torch.optim.AdamW(
                params, lr=train.dense_lr, weight_decay=train.dense_weight_decay
            ),
        )
        self.tables = KeyedOptimizerWrapper(
            tables,
            lambda params: table_optimizer(list(params), train.sparse_optimizer, train.sparse_lr),
        )
        self.sparse_tables = {
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, nn.EmbeddingBag) and module.sparse
        }

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.tables.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.tables.step()

    def init_state(self) -> None:
        """State tensors for a checkpoint to load into (zero-gradient steps; a sparse table's
        gradient is row-sparse, as ``nn.EmbeddingBag`` makes it)."""
        self.dense.init_state()
        for name, param in self.tables.params.items():
            zeros = torch.zeros_like(param)
            param.grad = zeros.to_sparse(sparse_dim=1) if name in self.sparse_tables else zeros
        self.tables.step()
        self.tables.zero_grad()


def build_plain_model(
    manifest: Manifest,
    config: ExperimentConfig,
    sparse_gradients: bool = True,
    features: ResolvedFeatures | None = None,
) -> TwoTowerModel:
    """The trainer's own :class:`TwoTowerModel` (towers, temperature, heads, forward) over
    plain-PyTorch bags instead of TorchRec collections."""
    if config.model.history.enabled:
        raise ValueError("the plain baseline has no history encoder: model.history.enabled")
    schema = model_schema(manifest, config, features)
    tables = model_tables(manifest, config, features)
    bags = PlainEmbeddingBags(schema, tables, config.model, sparse_gradients)
    sparse = SparsePart(bags=bags, pooled_features=list(bags.feature_order), dims=bags.dims)
    return TwoTowerModel(schema, sparse, config.model)


def step_context(
    model: nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    guard: StepGuard | None = None,
    features: ResolvedFeatures | None = None,
) -> StepContext:
    """What :func:`trainer.step.train_step` needs, with the plain optimizers."""
    return StepContext(
        dense_optimizer=cast(torch.optim.Optimizer, PlainOptimizers(model, config)),
        label_weights=label_weights(manifest, config).to(env.device),
        negatives=NegativeSampling.build(config, manifest, env, features),
        manifest=manifest,
        config=config,
        env=env,
        guard=guard,
        distillation=Distillation.build(config, manifest, env),
    )


@dataclass
class PlainTask:
    """The plain baseline in the trainer's loop (same step, logging, checkpoints)."""

    model: DistributedDataParallel
    context: StepContext
    loader: Any
    features: ResolvedFeatures

    @property
    def dense_optimizer(self) -> PlainOptimizers:
        return cast(PlainOptimizers, self.context.dense_optimizer)

    @classmethod
    def build(
        cls, config: ExperimentConfig, manifest: Manifest, session: Session, sparse: bool
    ) -> PlainTask:
        env, features = session.env, resolve_features(manifest, config)
        plain = build_plain_model(manifest, config, sparse, features)
        model = DistributedDataParallel(plain.to(env.device))
        context = step_context(model, manifest, config, env, session.guard(), features)
        loader = build_event_loader(
            loader_spec(config, config.data.train_split, True, manifest, features),
            manifest,
            env.rank,
            env.world_size,
        )
        return cls(model, context, loader, features)

    def step(self, batch: Batch, step: int) -> StepOutcome:
        return train_step(self.model, batch, step, self.context)

    def fallback_batch(self) -> Batch:
        config = self.context.config
        split = config.data.train_split
        return first_row_batch(self.context.manifest, config, split, self.features)

    def checkpoint_state(self) -> CheckpointState:
        negatives = self.context.negatives
        return CheckpointState(
            shared={
                "model": module_part(self.model),
                "dense_optimizer": optimizer_part(self.dense_optimizer.dense),
                "table_optimizer": optimizer_part(self.dense_optimizer.tables),
                "samplers": negatives,
            },
            rank={"samplers": StatePart(negatives.rank_state_dict, negatives.load_rank_state_dict)},
        )

    def meta(self) -> dict[str, Any]:
        return {"model": "plain"}


def train_plain(config: ExperimentConfig, sparse_gradients: bool) -> LoopResult:
    """The trainer's loop on the plain model (no evaluation): samples/s in metrics.jsonl every
    ``train.log_every_steps``, as the trainer logs it."""
    manifest = Manifest.load(config.data.path)
    session = Session.open(config)
    try:
        task = PlainTask.build(config, manifest, session, sparse_gradients)
        loop = TrainingLoop(session, task, LoopSpec.of(config.train))
        loop.restore(config.checkpoint.resume_from)
        result = loop.run()
    finally:
        session.close()
    if session.env.is_main:
        logger.info("plain baseline done: %d steps", result.steps)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the plain-PyTorch baseline.")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    parser.add_argument(
        "--dense-table-gradients",
        action="store_true",
        help="dense table gradients, all-reduced whole (default: sparse)",
    )
    args = parser.parse_intermixed_args(argv)
    configure_logging()
    try:
        config = load_config(args.config, args.overrides)
        result = train_plain(config, sparse_gradients=not args.dense_table_gradients)
    finally:
        shutdown()
    return 128 + result.stopped_by_signal if result.stopped_by_signal else 0


if __name__ == "__main__":
    sys.exit(main())
