"""A plain-PyTorch two-tower, the baseline the TorchRec trainer is benchmarked against.

The trainer's own :class:`models.two_tower.TwoTowerModel` (towers, temperature, forward) over a
plain-PyTorch sparse part: one ``nn.EmbeddingBag`` per table (pooling, sizes and initialization
from the same table configs) instead of TorchRec collections, no history encoder. Parameter
names match the TorchRec model's state dict, so weights copy across. Trained by the trainer's own step and loop (same loss, same logging) with
AdamW on the dense layers and the plain-PyTorch counterpart of ``train.sparse_optimizer`` on the
tables; DDP averages every gradient across ranks.

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
import time
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec import KeyedJaggedTensor, KeyedTensor, PoolingType

from config import ExperimentConfig, ModelConfig, SparseOptimizer, load_config, to_dict
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.schema import EventSchema, FeatureKind
from models.sparse_part import SparsePart
from models.towers import table_configs
from models.two_tower import TwoTowerModel
from trainer.build import label_weights, loader_spec, model_schema, model_tables
from trainer.distillation import Distillation
from trainer.negatives.negative_sampling import NegativeSampling
from trainer.runtime.distributed import DistributedEnv, init_distributed, seed_everything, shutdown
from trainer.runtime.logs import configure_logging
from trainer.runtime.run_files import METRICS_LOG_FILE
from trainer.runtime.run_logger import RunLogger
from trainer.runtime.synchronized import synchronized
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
    """AdamW on the dense layers and the table optimizer on the embedding bags, stepped
    together (the trainer's step calls ``zero_grad`` and ``step`` once each)."""

    def __init__(self, model: nn.Module, config: ExperimentConfig) -> None:
        tables = [p for n, p in model.named_parameters() if ".embedding_bags." in n]
        dense = [p for n, p in model.named_parameters() if ".embedding_bags." not in n]
        train = config.train
        self.optimizers = [
            torch.optim.AdamW(dense, lr=train.dense_lr, weight_decay=train.dense_weight_decay),
            table_optimizer(tables, train.sparse_optimizer, train.sparse_lr),
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def build_plain_model(
    manifest: Manifest, config: ExperimentConfig, sparse_gradients: bool = True
) -> TwoTowerModel:
    """The trainer's own :class:`TwoTowerModel` (towers, temperature, heads, forward) over
    plain-PyTorch bags instead of TorchRec collections."""
    if config.model.history.enabled:
        raise ValueError("the plain baseline has no history encoder: model.history.enabled")
    schema = model_schema(manifest, config)
    bags = PlainEmbeddingBags(
        schema, model_tables(manifest, config), config.model, sparse_gradients
    )
    sparse = SparsePart(bags=bags, pooled_features=list(bags.feature_order), dims=bags.dims)
    return TwoTowerModel(schema, sparse, config.model)


def step_context(
    model: nn.Module, manifest: Manifest, config: ExperimentConfig, env: DistributedEnv
) -> StepContext:
    """What :func:`trainer.train.train_step` needs, with the plain optimizers."""
    return StepContext(
        dense_optimizer=cast(torch.optim.Optimizer, PlainOptimizers(model, config)),
        label_weights=label_weights(manifest, config).to(env.device),
        negatives=NegativeSampling.build(config, manifest, env),
        manifest=manifest,
        config=config,
        env=env,
        distillation=Distillation.build(config, manifest, env),
    )


def train_plain(config: ExperimentConfig, sparse_gradients: bool) -> None:
    """The trainer's loop on the plain model (no checkpoint, no evaluation)."""
    env = init_distributed()
    seed_everything(config.seed)
    run_dir = Path(config.run.dir)
    manifest = Manifest.load(config.data.path)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_LOG_FILE).unlink(missing_ok=True)
    dist.barrier()
    plain = build_plain_model(manifest, config, sparse_gradients)
    model = DistributedDataParallel(plain.to(env.device))
    context = step_context(model, manifest, config, env)
    loader = build_event_loader(
        loader_spec(config, config.data.train_split, True, manifest),
        manifest,
        env.rank,
        env.world_size,
    )
    run_log = RunLogger(run_dir, env.is_main, False, "", config.run.name, to_dict(config))
    steps = _plain_loop(model, context, loader, env, run_log)
    if env.is_main:
        logger.info("plain baseline done: %d steps", steps)


def _plain_loop(
    model: nn.Module, context: StepContext, loader: object, env: DistributedEnv, run_log: RunLogger
) -> int:
    """The trainer's step over the epochs, logging samples/s every ``train.log_every_steps`` to
    metrics.jsonl as the trainer does (no checkpoints: the comparison favours the baseline)."""
    config = context.config.train
    step, window_steps, window_start = 0, 0, time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        for batch in synchronized(loader, env):  # type: ignore[arg-type]
            train_step(model, batch, step, context)
            step, window_steps = step + 1, window_steps + 1
            if step % config.log_every_steps == 0:
                elapsed = time.perf_counter() - window_start
                rate = window_steps * batch.size * env.world_size / max(elapsed, 1e-9)
                run_log.log({"step": step, "epoch": epoch, "samples_per_s": rate})
                window_steps, window_start = 0, time.perf_counter()
            if config.max_steps is not None and step >= config.max_steps:
                return step
    return step


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
        train_plain(config, sparse_gradients=not args.dense_table_gradients)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
