"""Reward alignment: the retrieval model (policy) learns what the frozen ranker (reward model)
values, held near a frozen copy of itself (reference). Losses: ``models/alignment.py``.

    start checkpoint (checkpoint.resume_from) -> policy, DMP-sharded and trainable as in training
                                               -> reference, one frozen unsharded replica
    alignment.reward_checkpoint                -> reward model, one frozen unsharded ranker

Each step takes a batch of the train split (one user row per event), embeds the corpus with the
policy (no gradient) for its exact top-``top_n`` (``trainer.mips.distributed_topk``), adds
``k - top_n`` exploration draws (``step_generator``: reproducible per seed, rank and step), scores
the K items with policy, reference and ranker, and takes one optimizer step on the alignment loss.
Checkpoints use the training layout (``<run.dir>/checkpoints/step-N``), so ``twotower eval --run``
evaluates an aligned run like any other. The expected ranker reward of the policy's top
``alignment.eval_k`` on ``eval.split`` is measured before and after (``align_summary.json``), and,
on a synthetic world, the same top-K's true expected reward and recall of the truly best items
(``trainer/evaluation/ground_truth.py``): the judge the policy does not optimise.

Run as ``twotower align CONFIG [k=v ...]`` (``--nproc N`` for torchrun) or
``torchrun --nproc_per_node 2 -m trainer.align CONFIG [k=v ...]``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel

from config import (
    CorpusDistribution,
    ExperimentConfig,
    to_dict,
    to_yaml,
)
from data_pipeline.batch import Batch
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.negatives import CorpusSampler, item_counts
from models.alignment import AlignmentLoss, alignment_loss
from models.two_tower import TwoTowerModel
from trainer.align_sources import (
    RewardFn,
    alignment_sources,
    load_reference,
    load_reward_model,
    load_truth,
)
from trainer.build import (
    build_dense_optimizer,
    build_sharded_model,
    item_store,
    loader_spec,
)
from trainer.evaluation.corpus import first_row_batch
from trainer.evaluation.evaluate import evaluate_model
from trainer.evaluation.ground_truth import (
    TopKRows,
    TopKTruth,
    TruthScorer,
    compare_top_k,
    top_k_truth,
)
from trainer.mips import distributed_topk
from trainer.negatives.negative_sampling import step_generator
from trainer.policy_corpus import embed_items, local_corpus, user_keys
from trainer.runtime.checkpoint import Checkpointer, Progress, load_model
from trainer.runtime.distributed import (
    DistributedEnv,
    init_distributed,
    seed_everything,
)
from trainer.runtime.entry import run_job
from trainer.runtime.faults import fire_if_due, planned_fault
from trainer.runtime.lr_schedule import DenseLRSchedule
from trainer.runtime.run_files import ALIGN_SUMMARY_FILE, BAD_BATCHES_DIR, CONFIG_FILE
from trainer.runtime.run_logger import RunLogger
from trainer.runtime.signals import StopSignals
from trainer.runtime.step_guard import StepGuard, count_skip
from trainer.runtime.synchronized import synchronized
from trainer.start_run import with_start_model

logger = logging.getLogger(__name__)


# (user features KJT stride U, item ids [U, K]) -> rewards [U, K]: the reward model's interface.
@dataclass
class AlignResult:
    """Args:
    steps: alignment steps of the whole run (resumed parts included).
    start_checkpoint, reference_checkpoint: the policy's start and the reference.
    checkpoint: the last checkpoint written.
    first, final: mean loss / KL / sampled-set expected reward of the first and last logging
        windows of this process's part of the run.
    reward_before, reward_after: mean ranker NUV of the policy's top ``alignment.eval_k`` on
        ``eval.split`` (one query per event) before the first and after the last step.
    reward_gain_stderr: standard error of ``reward_after - reward_before`` (paired over rows).
    truth_reward_before, truth_reward_after, truth_recall_before, truth_recall_after,
        truth_oracle_reward, truth_reward_gain_stderr: the same top-K judged by a synthetic
        world's ground truth (``trainer/evaluation/ground_truth.py``); None (left out of the summary)
        on datasets without one.
    metrics: retrieval metrics after alignment (``eval.at_end``), as ``twotower eval``.
    stopped_by_signal: the signal that stopped the run early (saved first; the after
        measurements are then not taken), or None.
    """

    steps: int
    start_checkpoint: str
    reference_checkpoint: str
    checkpoint: str
    first: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    reward_before: float = float("nan")
    reward_after: float = float("nan")
    reward_gain_stderr: float = float("nan")
    truth_reward_before: float | None = None
    truth_reward_after: float | None = None
    truth_recall_before: float | None = None
    truth_recall_after: float | None = None
    truth_oracle_reward: float | None = None
    truth_reward_gain_stderr: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stopped_by_signal: int | None = None

    def summary(self) -> dict[str, Any]:
        """The fields that were measured (None and NaN ones left out), for JSON."""
        return {
            key: value
            for key, value in asdict(self).items()
            if value is not None and not (isinstance(value, float) and math.isnan(value))
        }

    def measures(self) -> dict[str, float]:
        """The before/after measures that were taken, for the run log."""
        names = [f.name for f in fields(self) if f.name.startswith(("reward_", "truth_"))]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class _AlignRun:
    """The live objects of one alignment run (one rank)."""

    config: ExperimentConfig
    manifest: Manifest
    env: DistributedEnv
    policy: DistributedModelParallel
    dense_optimizer: Any
    reference: TwoTowerModel
    reference_items: torch.Tensor  # [num_items, D] by item id (0 where no corpus row)
    reward: RewardFn
    store: ItemFeatureStore
    explorer: CorpusSampler
    loader: Any
    checkpointer: Checkpointer
    run_log: RunLogger
    truth: TruthScorer | None  # a synthetic world's ground truth, None without one
    guard: StepGuard  # the pre-update vote: non-finite losses, stop signals
    schedule: DenseLRSchedule
    progress: Progress = field(default_factory=Progress)


def sample_candidates(
    top_ids: torch.Tensor, exploration_ids: torch.Tensor, live: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's sampled set: its top-N, then exploration draws; repeats masked out.

    Args:
        top_ids: [U, N] the policy's top items.
        exploration_ids: [U, K - N] corpus draws.
        live: [U] bool, False for padding rows.

    Returns:
        ids: [U, K] int64; mask: [U, K] bool, True for the first occurrence of each item in a
        live row.
    """
    ids = torch.cat([top_ids, exploration_ids], dim=1)
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [U, K, K]
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)
    repeated = (same & earlier).any(dim=2)
    return ids, ~repeated & live.unsqueeze(1)


def _explorer(config: ExperimentConfig, manifest: Manifest, store: ItemFeatureStore) -> Any:
    corpus = store.corpus_ids()
    if config.alignment.exploration is CorpusDistribution.UNIFORM:
        return CorpusSampler.uniform(corpus)
    paths = manifest.split_paths(config.data.path, config.data.train_split)
    counts = torch.from_numpy(item_counts(paths, store.num_items))[corpus]
    return CorpusSampler.unigram(corpus, counts, config.alignment.exploration_alpha)


def _build(
    config: ExperimentConfig,
    manifest: Manifest,
    env: DistributedEnv,
    reward: RewardFn | None,
    reference_path: Path,
    stop: StopSignals,
) -> _AlignRun:
    alignment = config.alignment
    trained = replace(
        config, train=replace(config.train, dense_lr=alignment.lr, sparse_lr=alignment.sparse_lr)
    )
    policy = build_sharded_model(manifest, trained, env)
    store = item_store(manifest, config)
    reference = load_reference(manifest, config, reference_path, env.device)
    corpus = store.corpus_ids()
    calls = max(1, -(-len(corpus) // config.data.eval_batch_size))
    reference_items = torch.zeros(store.num_items, config.model.output_dim, device=env.device)
    reference_items[corpus.to(env.device)] = embed_items(
        reference, store, corpus, calls, user_keys(manifest, config)
    )
    run_dir = Path(config.run.dir)
    if reward is None:
        # The ranker's own item side: every stored item feature, as it was trained on.
        reward = load_reward_model(
            config, manifest, ItemFeatureStore.load(config.data.path, manifest)
        )
    dense_optimizer = build_dense_optimizer(policy, trained)
    return _AlignRun(
        config=config,
        manifest=manifest,
        env=env,
        policy=policy,
        dense_optimizer=dense_optimizer,
        reference=reference,
        reference_items=reference_items,
        reward=reward,
        store=store,
        explorer=_explorer(config, manifest, store),
        loader=build_event_loader(
            loader_spec(config, config.data.train_split, True, manifest),
            manifest,
            env.rank,
            env.world_size,
        ),
        checkpointer=Checkpointer(run_dir, config.checkpoint, env.rank, env.world_size),
        run_log=RunLogger(
            run_dir,
            env.is_main,
            config.logging.wandb,
            config.logging.wandb_project,
            config.run.name,
            to_dict(config),
        ),
        truth=load_truth(config, manifest, store, reward, env),
        schedule=DenseLRSchedule(
            dense_optimizer, alignment.lr, config.train.lr_schedule, alignment.steps
        ),
        guard=StepGuard(env, stop, Path(config.run.dir) / BAD_BATCHES_DIR),
    )


def _state_parts(run: _AlignRun) -> dict[str, Any]:
    fused: Any = run.policy.fused_optimizer
    return {
        "model": run.policy.state_dict(),
        "sparse_optimizer": fused.state_dict()["state"],
        "dense_optimizer": run.dense_optimizer.state_dict()["state"],
    }


def _restore_or_start(run: _AlignRun, start: Path) -> None:
    """Resumes this run's latest checkpoint (model, optimizers, loader, step), else loads the
    start checkpoint's weights only: alignment is a new phase with fresh optimizers."""
    latest = run.checkpointer.latest()
    if latest is None or not run.config.checkpoint.resume:
        meta = load_model(start, run.policy)
        if run.env.is_main:
            logger.info("aligning from %s (step %s)", start, meta.get("step"))
        return
    run.dense_optimizer.init_state()  # optimizer tensors for DCP to load into
    parts = _state_parts(run)
    restored = run.checkpointer.restore(parts, {}, latest)
    assert restored is not None
    run.policy.load_state_dict(parts["model"])
    if restored.loader_state is not None:
        run.loader.load_state_dict(restored.loader_state)
    run.progress = restored.progress
    if run.env.is_main:
        logger.info("resumed alignment from %s at step %d", latest, run.progress.step)


def _save(run: _AlignRun, sources: dict[str, str]) -> Path:
    meta = {"config": to_dict(run.config), "alignment": sources}
    return run.checkpointer.save(_state_parts(run), {}, run.progress, run.loader.state_dict(), meta)


def _step(run: _AlignRun, batch: Batch) -> tuple[AlignmentLoss | None, bool]:
    """One collective alignment step: its losses (None when some rank's loss was not finite:
    no update) and whether some rank was asked to stop."""
    alignment, env = run.config.alignment, run.env
    run.dense_optimizer.zero_grad()
    generator = step_generator(run.config.seed, env.rank, run.progress.step, env.device)
    with torch.no_grad():
        corpus_ids, corpus = local_corpus(run.policy, run.store, run.manifest, run.config, env)
        users = run.policy(batch.user_features, batch.item_features).user.float()
        _, top_ids = distributed_topk(users, corpus, corpus_ids, alignment.top_n)
        explore, _ = run.explorer.sample(batch.size * (alignment.k - alignment.top_n), generator)
        ids, mask = sample_candidates(
            top_ids, explore.view(batch.size, -1).to(env.device), batch.weight > 0
        )
        rewards = run.reward(batch.user_features, ids)
        reference_users = run.reference.user_embeddings(batch.user_features)
        reference_scores = (
            torch.einsum("ud,ukd->uk", reference_users, run.reference_items[ids])
            / run.reference.temperature()
        )
    out = run.policy(batch.user_features, batch.item_features, run.store.lookup(ids.reshape(-1)))
    items = out.extra_items.view(batch.size, alignment.k, -1)
    scores = torch.einsum("ud,ukd->uk", out.user, items) / out.temperature
    result = alignment_loss(
        scores,
        reference_scores,
        rewards,
        mask,
        alignment.method,
        alignment.kl_coefficient,
        alignment.dpo_beta,
    )
    # The fused table optimizer updates inside backward: decide before it, on every rank.
    verdict = run.guard.vote(result.loss, batch, run.progress.step)
    if verdict.skip:
        return None, verdict.stop
    result.loss.backward()
    run.dense_optimizer.step()
    return result, verdict.stop


@torch.no_grad()
def top_k_rows(
    model: torch.nn.Module,
    reward: RewardFn,
    truth: TruthScorer | None,
    store: ItemFeatureStore,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
) -> TopKRows:
    """Ranker reward (and ground truth) of the model's top ``alignment.eval_k`` items (exact
    MIPS over the corpus, nothing excluded) for every event of ``eval.split``; collective."""
    was_training = model.training
    model.eval()
    corpus_ids, corpus = local_corpus(model, store, manifest, config, env)
    split = config.eval.split
    loader = build_event_loader(
        loader_spec(config, split, False, manifest), manifest, env.rank, env.world_size
    )
    rewards: list[torch.Tensor] = []
    truths: list[TopKTruth] = []
    for batch in synchronized(loader, env, lambda: first_row_batch(manifest, config, split)):
        users = model(batch.user_features, batch.item_features).user.float()
        _, ids = distributed_topk(users, corpus, corpus_ids, config.alignment.eval_k)
        live = batch.weight > 0
        rewards.append(reward(batch.user_features, ids).double().mean(dim=1)[live])
        if truth is not None:
            truths.append(top_k_truth(truth, batch.user_ids[live], ids[live]))
    model.train(was_training)
    empty = torch.zeros(0, dtype=torch.float64, device=env.device)
    columns = range(len(TopKTruth._fields))
    joined = TopKTruth(*(torch.cat([empty, *(t[c] for t in truths)]) for c in columns))
    return TopKRows(torch.cat([empty, *rewards]), joined if truth is not None else None)


def _window(run: _AlignRun, sums: dict[str, float], steps: int) -> dict[str, float]:
    """Means over the window's steps and over ranks; logged."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] / steps for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    means = dict(zip(keys, (values / run.env.world_size).tolist(), strict=True))
    run.run_log.log({"step": run.progress.step, "epoch": run.progress.epoch, **means})
    if run.env.is_main:
        logger.info(
            "step %d: %s", run.progress.step, " ".join(f"{k} {v:.4f}" for k, v in means.items())
        )
    return means


def _loop(run: _AlignRun, sources: dict[str, str]) -> tuple[list[dict[str, float]], int | None]:
    """Steps (cycling over epochs of the train split) until ``alignment.steps`` or a stop
    signal (saved by the caller); the logged windows and the stopping signal."""
    total, env = run.config.alignment.steps, run.env
    fault = planned_fault(env.rank)
    stopped_by: int | None = None
    fallback = lambda: first_row_batch(run.manifest, run.config, run.config.data.train_split)  # noqa: E731
    windows: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    steps = 0
    run.policy.train()
    for epoch in itertools.count(run.progress.epoch):
        if run.progress.step >= total or stopped_by is not None:
            break
        run.progress.epoch = epoch
        run.loader.dataset.set_epoch(epoch)
        for batch in synchronized(run.loader, env, fallback):
            run.schedule.apply(run.progress.step)
            result, stop = _step(run, batch)
            run.progress.step += 1
            if result is None:
                count_skip(run.progress, run.config.train, run.guard.bad_batch_dir)
            else:
                steps += 1
                for key, value in zip(result._fields, result, strict=True):
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
            if run.progress.step % run.config.train.log_every_steps == 0 and steps:
                windows.append(_window(run, sums, steps))
                sums, steps = {}, 0
            if stop:
                stopped_by = (run.guard.stop.received if run.guard.stop else None) or 15
            if run.progress.step >= total or stopped_by is not None:
                break
            if run.checkpointer.due(run.progress.step):
                _save(run, sources)
            fire_if_due(fault, run.progress.step)
    if steps:
        windows.append(_window(run, sums, steps))
    return windows, stopped_by


def align(config: ExperimentConfig, reward: RewardFn | None = None) -> AlignResult:
    """Aligns (or resumes aligning) the retrieval model of ``checkpoint.resume_from`` to the
    ranker of ``alignment.reward_checkpoint`` (or to ``reward``, any callable of the same
    interface, e.g. a test's known reward). Collective over the current process group."""
    start, reference_path = alignment_sources(config)
    config = with_start_model(config, start, "checkpoint.resume_from")
    if config.alignment.reference_checkpoint is not None:
        with_start_model(config, reference_path, "alignment.reference_checkpoint")
    env = init_distributed()
    seed_everything(config.seed)
    run_dir = Path(config.run.dir)
    manifest = Manifest.load(config.data.path)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_yaml(config))
    dist.barrier()
    stop = StopSignals(config.checkpoint.signals)
    try:
        run = _build(config, manifest, env, reward, reference_path, stop)
        _restore_or_start(run, start)
        sources = {"start": str(start), "reference": str(reference_path)}
        sources["reward"] = str(config.alignment.reward_checkpoint)
        before = top_k_rows(run.policy, run.reward, run.truth, run.store, manifest, config, env)
        run.run_log.start(run.progress.step or None)
        windows, stopped_by = _loop(run, sources)
    finally:
        stop.close()
    run.checkpointer.finish()
    latest = run.checkpointer.latest()
    done = latest is not None and latest.name == f"step-{run.progress.step}"
    checkpoint = latest if done and latest is not None else _save(run, sources)
    run.checkpointer.finish()
    result = AlignResult(
        steps=run.progress.step,
        start_checkpoint=str(start),
        reference_checkpoint=str(reference_path),
        checkpoint=str(checkpoint),
        first=windows[0] if windows else {},
        final=windows[-1] if windows else {},
        stopped_by_signal=stopped_by,
    )
    if stopped_by is None:
        after = top_k_rows(run.policy, run.reward, run.truth, run.store, manifest, config, env)
        for name, value in compare_top_k(before, after, env)._asdict().items():
            setattr(result, name, value)
    if config.eval.at_end and stopped_by is None:
        result.metrics = evaluate_model(run.policy, manifest, config, env, run_dir)["model"]
    run.run_log.log({"step": result.steps, **result.measures()})
    if env.is_main:
        (run_dir / ALIGN_SUMMARY_FILE).write_text(
            json.dumps(result.summary(), indent=2, default=float)
        )
        _log_measures(config, result)
    run.run_log.close()
    return result


def _log_measures(config: ExperimentConfig, result: AlignResult) -> None:
    """One line: ranker reward (and ground truth) of the top-K before -> after."""
    measures = " ".join(f"{name} {value:.4f}" for name, value in result.measures().items())
    logger.info("top %d on %s: %s", config.alignment.eval_k, config.eval.split, measures)


def main(argv: list[str] | None = None) -> int:
    # Stopped by a signal after saving: exit as the signal would have (a scheduler requeues).
    return run_job(
        "trainer.align",
        align,
        argv,
        lambda result: 128 + result.stopped_by_signal if result.stopped_by_signal else 0,
    )


if __name__ == "__main__":
    sys.exit(main())
