"""The training loop: build -> for each batch: forward, loss, backward, step -> log, save, evaluate.

Run as ``twotower train CONFIG [k=v ...]`` (one process) or
``torchrun --nproc_per_node 2 -m trainer.train CONFIG [k=v ...]``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from models.losses import net_user_value, sampled_softmax_loss
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
from trainer.global_negatives import gather_candidates
from trainer.logs import configure_logging
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


def train_step(
    model: torch.nn.Module,
    dense_optimizer: torch.optim.Optimizer,
    batch: Batch,
    weights: torch.Tensor,
    config: ExperimentConfig,
) -> torch.Tensor:
    """One step. The fused table optimizer updates inside ``backward()``. Returns the loss."""
    dense_optimizer.zero_grad()
    user, item = model(batch.user_features, batch.item_features)
    row_weights = net_user_value(batch.labels, weights) * batch.weight
    if config.loss.global_negatives:
        candidates, candidate_ids, positive_index = gather_candidates(item, batch.item_ids)
    else:
        candidates, candidate_ids = item, batch.item_ids
        positive_index = torch.arange(item.shape[0], device=item.device)
    loss = sampled_softmax_loss(
        user,
        candidates,
        candidate_ids,
        positive_index,
        row_weights,
        config.model.temperature,
        config.loss.mask_accidental_hits,
    )
    loss.backward()
    dense_optimizer.step()
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

    weights = label_weights(manifest, config).to(env.device)
    model = build_sharded_model(manifest, config, env)
    dense_optimizer = build_dense_optimizer(model, config)
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
    result = _loop(model, dense_optimizer, loader, weights, config, env, run_log, rows_per_epoch)
    result.checkpoint = str(
        save_checkpoint(run_dir, result.steps, model, {"rows": result.rows_trained}, env.is_main)
    )
    if config.eval.at_end:
        from trainer.evaluate import evaluate_model

        metrics = evaluate_model(model, manifest, config, env, run_dir)
        run_log.log({"step": result.steps, **{f"eval/{k}": v for k, v in metrics["model"].items()}})
    run_log.close()
    return result


def _loop(
    model: torch.nn.Module,
    dense_optimizer: torch.optim.Optimizer,
    loader: Any,
    weights: torch.Tensor,
    config: ExperimentConfig,
    env: DistributedEnv,
    run_log: RunLogger,
    rows_per_epoch: int,
) -> TrainResult:
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
            loss = train_step(model, dense_optimizer, batch, weights, config)
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
