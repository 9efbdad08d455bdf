"""The training loop: build -> for each batch: forward, loss, backward, step -> log, save, evaluate.

Run as ``twotower train CONFIG [k=v ...]`` (one process) or
``torchrun --nproc_per_node 2 -m trainer.train CONFIG [k=v ...]``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from models.losses import net_user_value
from models.retrieval_loss import retrieval_loss
from trainer.build import (
    build_dense_optimizer,
    build_sharded_model,
    label_weights,
    loader_spec,
)
from trainer.checkpoint import save_checkpoint
from trainer.config import ExperimentConfig, load_config, to_dict, to_yaml
from trainer.distributed import (
    DistributedEnv,
    init_distributed,
    seed_everything,
    shutdown,
)
from trainer.logs import configure_logging
from trainer.negative_sampling import NegativeSampling, step_generator
from trainer.run_logger import RunLogger
from trainer.synchronized import synchronized

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    rows_trained: int
    final_loss: float
    samples_per_second: float
    checkpoint: str


@dataclass
class StepContext:
    """What a training step needs besides the model and the batch.

    Args:
        dense_optimizer: optimizer of the data-parallel parameters.
        label_weights: [T] net-user-value weights.
        negatives: the configured negative sources.
        manifest: the dataset manifest (corpus for mined negatives).
        config: the experiment configuration.
        rank: this rank (seeds the step's random draws).
    """

    dense_optimizer: torch.optim.Optimizer
    label_weights: torch.Tensor
    negatives: NegativeSampling
    manifest: Manifest
    config: ExperimentConfig
    rank: int


def train_step(model: torch.nn.Module, batch: Batch, step: int, ctx: StepContext) -> torch.Tensor:
    """One step. The fused table optimizer updates inside ``backward()``. Returns the loss."""
    ctx.dense_optimizer.zero_grad()
    generator = step_generator(ctx.config.seed, ctx.rank, step, batch.item_ids.device)
    extra = ctx.negatives.plan(model, batch, step, generator, ctx.manifest)
    outputs = model(batch.user_features, batch.item_features, ctx.negatives.features(extra))
    ctx.negatives.observe(batch, step)
    scored, in_batch = ctx.negatives.score(outputs, batch, extra, step)
    row_weights = net_user_value(batch.labels, ctx.label_weights) * batch.weight
    loss = retrieval_loss(scored, outputs.temperature, row_weights, ctx.config.loss, generator)
    loss.backward()
    ctx.dense_optimizer.step()
    ctx.negatives.remember(in_batch, step)
    return loss.detach()


def _mean_across_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def train(config: ExperimentConfig) -> TrainResult:
    env = init_distributed()
    seed_everything(config.seed)
    run_dir = Path(config.run.dir)
    manifest = Manifest.load(config.data.path)
    if config.data.verify_checksums and env.is_main:
        manifest.verify_checksums(config.data.path, config.data.train_split)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))
        # A fresh run starts a fresh metrics log (resuming is a later capability).
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    dist.barrier()

    model = build_sharded_model(manifest, config, env)
    context = StepContext(
        dense_optimizer=build_dense_optimizer(model, config),
        label_weights=label_weights(manifest, config).to(env.device),
        negatives=NegativeSampling.build(config, manifest, env),
        manifest=manifest,
        config=config,
        rank=env.rank,
    )
    loader = build_event_loader(
        loader_spec(config, config.data.train_split, train=True), manifest, env.rank, env.world_size
    )
    if env.is_main:
        logger.info("sharding plan:\n%s", model.plan)
    run_log = RunLogger(
        run_dir,
        env.is_main,
        config.logging.wandb,
        config.logging.wandb_project,
        config.run.name,
        to_dict(config),
    )
    rows_per_epoch = manifest.splits[config.data.train_split].rows
    result = training_loop(model, context, loader, env, run_log, rows_per_epoch)
    meta = {"rows": result.rows_trained}
    samplers = context.negatives.state_dict()
    result.checkpoint = str(
        save_checkpoint(run_dir, result.steps, model, meta, env.is_main, samplers)
    )
    if env.is_main:
        (run_dir / "train_summary.json").write_text(json.dumps(asdict(result), indent=2))
    if config.eval.at_end:
        from trainer.evaluate import evaluate_model

        metrics = evaluate_model(model, manifest, config, env, run_dir)
        run_log.log({"step": result.steps, **{f"eval/{k}": v for k, v in metrics["model"].items()}})
    run_log.close()
    return result


def training_loop(
    model: torch.nn.Module,
    context: StepContext,
    loader: Any,
    env: DistributedEnv,
    run_log: RunLogger,
    rows_per_epoch: int,
) -> TrainResult:
    """Epochs of :func:`train_step` over ``loader``; logs loss and samples/s every
    ``train.log_every_steps`` (the benchmark's plain baseline runs this same loop)."""
    config = context.config
    total_steps = config.train.max_steps
    global_batch = config.data.batch_size * env.world_size
    estimate = -(-rows_per_epoch // global_batch) * config.train.epochs  # tails make it approximate
    progress = tqdm(
        total=min(total_steps or estimate, estimate),
        disable=not (env.is_main and config.train.progress_bar),
        unit="step",
    )
    step, rows, window_loss, window_steps = 0, 0, 0.0, 0
    start = window_start = time.perf_counter()
    loss_value = float("nan")
    model.train()
    for epoch in range(config.train.epochs):
        loader.dataset.set_epoch(epoch)
        for batch in synchronized(loader, env):
            loss = train_step(model, batch, step, context)
            step += 1
            live_rows = int((batch.weight > 0).sum())
            rows += live_rows
            window_loss += float(loss)
            window_steps += 1
            if step % config.train.log_every_steps == 0:
                loss_value = _mean_across_ranks(window_loss / window_steps, env.device)
                elapsed = time.perf_counter() - window_start
                rate = window_steps * batch.size * env.world_size / max(elapsed, 1e-9)
                run_log.log(
                    {"step": step, "epoch": epoch, "loss": loss_value, "samples_per_s": rate}
                )
                progress.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{rate:,.0f}")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            progress.update(1)
            if total_steps is not None and step >= total_steps:
                break
        if total_steps is not None and step >= total_steps:
            break
    if window_steps:
        loss_value = _mean_across_ranks(window_loss / window_steps, env.device)
        run_log.log({"step": step, "epoch": epoch, "loss": loss_value})
    progress.close()
    seconds = time.perf_counter() - start
    total_rows = int(_mean_across_ranks(rows, env.device) * env.world_size)
    logger.info("trained %d steps, %d rows (%d per epoch)", step, total_rows, rows_per_epoch)
    return TrainResult(step, total_rows, loss_value, total_rows / max(seconds, 1e-9), "")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m trainer.train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    configure_logging()
    config = load_config(args[0], args[1:])
    try:
        result = train(config)
        if dist.get_rank() == 0:
            logger.info("done: %s", result)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
