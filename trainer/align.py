"""Reward alignment: the retrieval model (policy) learns what the frozen ranker (reward model)
values, held near a frozen copy of itself (reference). Losses: ``models/alignment.py``.

    start checkpoint (checkpoint.resume_from) -> policy, DMP-sharded and trainable as in training
                                               -> reference, one frozen unsharded replica
    alignment.reward_checkpoint                -> reward model, one frozen unsharded ranker

A task of the one training loop (``trainer.runtime.loop``). Each step takes a batch of the train split (one user row per event), embeds the corpus with the
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

import functools
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torchrec.distributed import DistributedModelParallel

from config import CorpusDistribution, ExperimentConfig
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
    with_teacher_user_features,
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
from trainer.features import ResolvedFeatures, resolve_features
from trainer.mips import distributed_topk
from trainer.negatives.negative_sampling import step_generator
from trainer.policy_corpus import embed_items, local_corpus, user_keys
from trainer.runtime.checkpoint import load_model
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.entry import run_job
from trainer.runtime.loop import LoopResult, LoopSpec, TrainingLoop
from trainer.runtime.run_files import ALIGN_SUMMARY_FILE
from trainer.runtime.session import Session
from trainer.runtime.state import CheckpointState, sharded_model_parts
from trainer.runtime.step_guard import StepGuard, StepOutcome, Verdict
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
    resumed_from: the alignment checkpoint this process resumed from, or None.
    skipped_steps: steps skipped for a non-finite loss (``alignment.train.non_finite_loss``).
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
    resumed_from: str | None = None
    skipped_steps: int = 0

    @classmethod
    def of(cls, loop: LoopResult, sources: dict[str, str]) -> AlignResult:
        return cls(
            steps=loop.steps,
            start_checkpoint=sources["start"],
            reference_checkpoint=sources["reference"],
            checkpoint=loop.checkpoint,
            first=loop.first_window,
            final=loop.final_window,
            stopped_by_signal=loop.stopped_by_signal,
            resumed_from=loop.resumed_from,
            skipped_steps=loop.skipped_steps,
        )

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
class AlignTask:
    """The alignment job in the loop: the policy (DMP-sharded, trainable), its frozen reference
    and the frozen reward model."""

    config: ExperimentConfig
    manifest: Manifest
    env: DistributedEnv
    model: DistributedModelParallel  # the policy
    dense_optimizer: Any
    reference: TwoTowerModel
    reference_items: torch.Tensor  # [num_items, D] by item id (0 where no corpus row)
    reward: RewardFn
    store: ItemFeatureStore
    explorer: CorpusSampler
    loader: Any
    truth: TruthScorer | None  # a synthetic world's ground truth, None without one
    guard: StepGuard  # the pre-update vote: non-finite losses, stop signals
    sources: dict[str, str]  # start, reference and reward checkpoints (in each checkpoint)
    reads: ResolvedFeatures  # what the loaders read: the policy's and the ranker's features
    keys: list[str]  # the policy's user keys (empty bags when embedding items)

    def step(self, batch: Batch, step: int) -> StepOutcome:
        result, verdict = _step(self, batch, step)
        losses = {key: value.detach() for key, value in zip(result._fields, result, strict=True)}
        return StepOutcome(losses, verdict.skip, verdict.stop)

    def fallback_batch(self) -> Batch:
        split = self.config.data.train_split
        return first_row_batch(self.manifest, self.config, split, self.reads)

    def checkpoint_state(self) -> CheckpointState:
        return CheckpointState(shared=sharded_model_parts(self.model, self.dense_optimizer))

    def meta(self) -> dict[str, Any]:
        return {"alignment": self.sources}

    def top_k_rows(self) -> TopKRows:
        """The policy's top-K judged by the reward model (and ground truth) on ``eval.split``."""
        return top_k_rows(self)

    def corpus(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's corpus slice through the policy: (ids [n_r], embeddings [n_r, D])."""
        batch_size = self.config.data.eval_batch_size
        return local_corpus(self.model, self.store, self.keys, batch_size, self.env)


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
    features: ResolvedFeatures,
    session: Session,
    reward: RewardFn | None,
    sources: dict[str, str],
) -> AlignTask:
    """``features``: resolved once by the job; its loaders also read the ranker's user
    features (the reward model scores their users)."""
    env, train = session.env, config.alignment.train
    policy = build_sharded_model(manifest, config, env, features, train)
    store = item_store(manifest, config, features)
    reference_path = Path(sources["reference"])
    reference = load_reference(manifest, config, reference_path, env.device, features)
    keys = user_keys(manifest, config, features)
    corpus = store.corpus_ids()
    calls = max(1, -(-len(corpus) // config.data.eval_batch_size))
    reference_items = torch.zeros(store.num_items, config.model.output_dim, device=env.device)
    reference_items[corpus.to(env.device)] = embed_items(reference, store, corpus, calls, keys)
    if reward is None:
        # The ranker's own item side: every stored item feature, as it was trained on.
        reward = load_reward_model(
            config, manifest, ItemFeatureStore.load(config.data.path, manifest)
        )
    reads = with_teacher_user_features(features, manifest)
    # The policy scores logged rows: one event per row even for a model trained on windows.
    spec = replace(
        loader_spec(config, config.data.train_split, True, manifest, reads), sequence_length=0
    )
    loader = build_event_loader(
        spec,
        manifest,
        env.rank,
        env.world_size,
    )
    return AlignTask(
        config=config,
        manifest=manifest,
        env=env,
        model=policy,
        dense_optimizer=build_dense_optimizer(policy, config, train),
        reference=reference,
        reference_items=reference_items,
        reward=reward,
        store=store,
        explorer=_explorer(config, manifest, store),
        loader=loader,
        truth=load_truth(config, manifest, store, reward, env),
        guard=session.guard(),
        sources=sources,
        reads=reads,
        keys=keys,
    )


def _step(task: AlignTask, batch: Batch, step: int) -> tuple[AlignmentLoss, Verdict]:
    """One collective alignment step: its losses and the vote (no update when some rank's
    loss was not finite)."""
    alignment, env = task.config.alignment, task.env
    task.dense_optimizer.zero_grad()
    generator = step_generator(task.config.seed, env.rank, step, env.device)
    with torch.no_grad():
        corpus_ids, corpus = task.corpus()
        users = task.model(batch.user_features, batch.item_features).user.float()
        _, top_ids = distributed_topk(users, corpus, corpus_ids, alignment.top_n)
        explore, _ = task.explorer.sample(batch.size * (alignment.k - alignment.top_n), generator)
        ids, mask = sample_candidates(
            top_ids, explore.view(batch.size, -1).to(env.device), batch.weight > 0
        )
        rewards = task.reward(batch.user_features, ids)
        reference_users = task.reference.user_embeddings(batch.user_features)
        reference_scores = (
            torch.einsum("ud,ukd->uk", reference_users, task.reference_items[ids])
            / task.reference.temperature()
        )
    out = task.model(batch.user_features, batch.item_features, task.store.lookup(ids.reshape(-1)))
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
    verdict = task.guard.vote(result.loss, batch, step)
    if not verdict.skip:
        result.loss.backward()
        task.dense_optimizer.step()
    return result, verdict


@torch.no_grad()
def top_k_rows(task: AlignTask) -> TopKRows:
    """Ranker reward (and ground truth) of the policy's top ``alignment.eval_k`` items (exact
    MIPS over the corpus, nothing excluded) for every event of ``eval.split``; collective."""
    model, config, env = task.model, task.config, task.env
    was_training = model.training
    model.eval()
    corpus_ids, corpus = task.corpus()
    split = config.eval.split
    spec = loader_spec(config, split, False, task.manifest, task.reads)
    loader = build_event_loader(spec, task.manifest, env.rank, env.world_size)
    fallback = functools.partial(first_row_batch, task.manifest, config, split, task.reads)
    rewards: list[torch.Tensor] = []
    truths: list[TopKTruth] = []
    for batch in synchronized(loader, env, fallback):
        users = model(batch.user_features, batch.item_features).user.float()
        _, ids = distributed_topk(users, corpus, corpus_ids, config.alignment.eval_k)
        live = batch.weight > 0
        rewards.append(task.reward(batch.user_features, ids).double().mean(dim=1)[live])
        if task.truth is not None:
            truths.append(top_k_truth(task.truth, batch.user_ids[live], ids[live]))
    model.train(was_training)
    empty = torch.zeros(0, dtype=torch.float64, device=env.device)
    columns = range(len(TopKTruth._fields))
    joined = TopKTruth(*(torch.cat([empty, *(t[c] for t in truths)]) for c in columns))
    return TopKRows(torch.cat([empty, *rewards]), joined if task.truth is not None else None)


def align(config: ExperimentConfig, reward: RewardFn | None = None) -> AlignResult:
    """Aligns (or resumes aligning) the retrieval model of ``checkpoint.resume_from`` to the
    ranker of ``alignment.reward_checkpoint`` (or to ``reward``, any callable of the same
    interface, e.g. a test's known reward). Collective over the current process group."""
    start, reference_path = alignment_sources(config)
    config = with_start_model(config, start, "checkpoint.resume_from")
    if config.alignment.reference_checkpoint is not None:
        with_start_model(config, reference_path, "alignment.reference_checkpoint")
    manifest = Manifest.load(config.data.path)
    features = resolve_features(manifest, config)
    sources = {
        "start": str(start),
        "reference": str(reference_path),
        "reward": str(config.alignment.reward_checkpoint),
    }
    session = Session.open(config)
    try:
        task = _build(config, manifest, features, session, reward, sources)
        loop = TrainingLoop(session, task, LoopSpec.of(config.alignment.train, "alignment.train"))
        if loop.restore() is None:
            # A new phase: the start checkpoint's weights, fresh optimizers.
            meta = load_model(start, task.model)
            if session.env.is_main:
                logger.info("aligning from %s (step %s)", start, meta.get("step"))
        before = task.top_k_rows()
        result = AlignResult.of(loop.run(), sources)
        if result.stopped_by_signal is None:
            after = task.top_k_rows()
            for name, value in compare_top_k(before, after, session.env)._asdict().items():
                setattr(result, name, value)
            if config.eval.at_end:
                metrics = evaluate_model(
                    task.model, manifest, config, session.env, session.run_dir, features=features
                )
                result.metrics = metrics["model"]
        session.run_log.log({"step": result.steps, **result.measures()})
        if session.env.is_main:
            summary = json.dumps(result.summary(), indent=2, default=float)
            (session.run_dir / ALIGN_SUMMARY_FILE).write_text(summary)
            _log_measures(config, result)
    finally:
        session.close()
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
