"""Where each training row's negatives come from, and how they are scored.

Per step, in order: :meth:`NegativeSampling.plan` picks the items outside the batch (corpus
samples shared by the batch, impression and mined hard negatives per row) so one forward pass
embeds them with their real features; :meth:`observe` updates the rank-synchronized frequency
estimator; :meth:`score` lays every candidate out per row as
:class:`models.retrieval_loss.ScoredCandidates` with logQ corrections and weights; :meth:`remember`
pushes the step's in-batch items into the cross-batch memory.

logQ correction subtracts the log of an item's expected count in the candidate set it came
from: ``log q(j) + log(C / B_global)`` for in-batch (C candidate rows) and memory (C entries)
items, with q the estimator's per-global-batch probability; ``log(S * p(j))`` for S corpus
samples drawn with probability p. Hard negatives are not corrected; their config weight counts
each as that many negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from data_pipeline.batch import Batch
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from data_pipeline.negatives import (
    CorpusSampler,
    CrossBatchMemory,
    StreamingFrequencyEstimator,
    item_counts,
)
from data_pipeline.schema import IMPRESSION_NEGATIVES
from models.retrieval_loss import ScoredCandidates
from models.two_tower import TowerOutputs
from trainer.build import item_store
from trainer.config import ConfigError, CorpusDistribution, ExperimentConfig
from trainer.distributed import DistributedEnv
from trainer.global_negatives import gather_candidates
from trainer.mined_negatives import CorpusMiner


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, rank, step): draws are reproducible and a resumed
    run draws what the uninterrupted run would have drawn."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state) & ((1 << 63) - 1))
    return generator


@dataclass
class ExtraItems:
    """Items outside the batch embedded in this step's forward pass.

    Args:
        ids: [E] int64, E = S + B * K_imp + B * K_mined, in that order; -1 marks a missing
            hard negative (looked up as a placeholder, weight 0).
        sample_log_prob: [S] log p of each corpus sample (one draw).
        impressions: [B, K_imp] impression hard negatives, -1 padded.
        mined: [B, K_mined] mined hard negatives, -1 padded.
    """

    ids: torch.Tensor
    sample_log_prob: torch.Tensor
    impressions: torch.Tensor
    mined: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.sample_log_prob.shape[0])


@dataclass
class CandidateBlock:
    """Candidates shared by every row: embeddings [C, D], ids [C] (-1 padding), log q [C]."""

    embeddings: torch.Tensor
    ids: torch.Tensor
    log_q: torch.Tensor


@dataclass
class NegativeSampling:
    """The configured negative sources of one rank. Build with :meth:`build`.

    Args:
        config: the experiment configuration.
        env: this rank.
        store: item features for items outside the batch (None when no source needs them).
        sampler: corpus sampler for mixed negatives (None: off).
        estimator: streaming frequency estimator (None: logQ correction off).
        memory: cross-batch memory (None: off).
        miner: semi-hard negative miner (None: off).
    """

    config: ExperimentConfig
    env: DistributedEnv
    store: ItemFeatureStore | None = None
    sampler: CorpusSampler | None = None
    estimator: StreamingFrequencyEstimator | None = None
    memory: CrossBatchMemory | None = None
    miner: CorpusMiner | None = None
    _placeholder: int = field(default=0, repr=False)

    @staticmethod
    def build(
        config: ExperimentConfig, manifest: Manifest, env: DistributedEnv
    ) -> NegativeSampling:
        """Loads what the enabled sources need; a source the data cannot support is a
        :class:`ConfigError` naming the keys."""
        negatives = config.negatives
        check_supported(config, manifest)
        needs_store = (
            negatives.mixed.num_samples > 0
            or negatives.impressions.per_row > 0
            or negatives.mined.per_row > 0
        )
        store = item_store(manifest, config) if needs_store else None
        sampler = _corpus_sampler(config, manifest, store) if store is not None else None
        estimator = None
        if negatives.log_q.enabled:
            estimator = StreamingFrequencyEstimator(
                hash_size=negatives.log_q.hash_size,
                num_hashes=negatives.log_q.num_hashes,
                alpha=negatives.log_q.alpha,
                device=env.device,
            )
        memory = None
        if negatives.memory.size > 0:
            memory = CrossBatchMemory(
                capacity=negatives.memory.size,
                dim=config.model.output_dim,
                warmup_steps=negatives.memory.warmup_steps,
                max_staleness_steps=negatives.memory.max_staleness_steps,
                device=env.device,
            )
        miner = CorpusMiner(negatives.mined) if negatives.mined.per_row > 0 else None
        placeholder = int(store.corpus_ids()[0]) if store is not None else 0
        return NegativeSampling(config, env, store, sampler, estimator, memory, miner, placeholder)

    def plan(
        self,
        model: torch.nn.Module,
        batch: Batch,
        step: int,
        generator: torch.Generator,
        manifest: Manifest,
    ) -> ExtraItems | None:
        """Chooses this step's extra items (collective when mining). None when no source
        adds items outside the batch."""
        if self.store is None:
            return None
        device = self.env.device
        rows = batch.size
        samples = self.config.negatives.mixed.num_samples
        if samples > 0 and self.sampler is not None:
            sample_ids, log_prob = self.sampler.sample(samples, generator)
        else:
            sample_ids, log_prob = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        impressions = batch.impression_negatives[:, : self.config.negatives.impressions.per_row]
        mined = torch.full((rows, 0), -1, dtype=torch.int64, device=device)
        if self.miner is not None:
            self.miner.refresh_if_due(model, manifest, self.config, self.env, step)
            mined = self.miner.mine(model, batch, generator)
        ids = torch.cat(
            [sample_ids.to(device), impressions.reshape(-1).to(device), mined.reshape(-1)]
        )
        return ExtraItems(ids, log_prob.to(device), impressions.to(device), mined)

    def features(self, extra: ExtraItems | None) -> KeyedJaggedTensor | None:
        """Item features of the extra items (stride E), placeholders for -1."""
        if extra is None or self.store is None:
            return None
        ids = torch.where(extra.ids >= 0, extra.ids, torch.full_like(extra.ids, self._placeholder))
        return self.store.lookup(ids.cpu()).to(self.env.device)

    def observe(self, batch: Batch, step: int) -> None:
        """Feeds the global batch's item ids to the frequency estimator (collective)."""
        if self.estimator is None:
            return
        live = torch.where(batch.weight > 0, batch.item_ids, torch.full_like(batch.item_ids, -1))
        self.estimator.update_synchronized(live[live >= 0], step)

    def score(
        self, outputs: TowerOutputs, batch: Batch, extra: ExtraItems | None, step: int
    ) -> tuple[ScoredCandidates, CandidateBlock]:
        """Every row's positive and negatives. Returns the scores and the in-batch block (for
        :meth:`remember`)."""
        user, item = outputs.user, outputs.item
        positive_ids = batch.item_ids
        # Padding rows (weight 0, a rank out of data) are no one's negatives.
        candidate_ids = torch.where(
            batch.weight > 0, positive_ids, torch.full_like(positive_ids, -1)
        )
        in_batch, positive_index = self._in_batch(item, candidate_ids)
        blocks = [in_batch]
        if extra is not None and extra.num_samples > 0:
            blocks.append(self._corpus_samples(outputs.extra_items, extra))
        if self.memory is not None:
            blocks.append(self._memory_block(step))
        shared = CandidateBlock(*(torch.cat(parts) for parts in zip(*map(_fields, blocks))))
        negatives = user @ shared.embeddings.T
        weights = (shared.ids >= 0).to(user.dtype).expand_as(negatives).clone()
        if self.config.loss.mask_accidental_hits:
            weights = weights * (shared.ids.unsqueeze(0) != positive_ids.unsqueeze(1))
        rows = torch.arange(user.shape[0], device=user.device)
        weights[rows, positive_index] = 0.0
        log_q = shared.log_q.expand_as(negatives)
        scored = ScoredCandidates(
            positive=(user * item).sum(dim=1),
            negatives=negatives,
            weights=weights,
            positive_log_q=in_batch.log_q[positive_index],
            negative_log_q=log_q,
            ids=shared.ids.expand_as(negatives),
        )
        if extra is not None:
            scored = self._with_hard_negatives(scored, user, outputs.extra_items, extra, batch)
        return scored, in_batch

    def remember(self, in_batch: CandidateBlock, step: int) -> None:
        """Pushes this step's in-batch items (detached) into the cross-batch memory."""
        if self.memory is not None:
            self.memory.push(in_batch.embeddings.detach(), in_batch.ids, step)

    def state_dict(self) -> dict[str, Any]:
        """Replicated sampler state for checkpoints (tensors only): the frequency estimator,
        identical on every rank."""
        if self.estimator is None:
            return {}
        return {"frequency_estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.estimator is not None and "frequency_estimator" in state:
            self.estimator.load_state_dict(state["frequency_estimator"])

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own sampler state: the cross-batch memory (it holds this rank's items).

        The mined-negative index is not saved: a resumed run rebuilds it at its first step."""
        if self.memory is None:
            return {}
        return {"memory": self.memory.state_dict()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if self.memory is not None and "memory" in state:
            self.memory.load_state_dict(state["memory"])

    def _in_batch(
        self, item: torch.Tensor, item_ids: torch.Tensor
    ) -> tuple[CandidateBlock, torch.Tensor]:
        if self.config.loss.global_negatives:
            embeddings, ids, positive_index = gather_candidates(item, item_ids)
        else:
            embeddings, ids = item, item_ids
            positive_index = torch.arange(item.shape[0], device=item.device)
        rows = int((ids >= 0).sum())
        return CandidateBlock(embeddings, ids, self._log_q(ids, rows)), positive_index

    def _corpus_samples(self, extra_embeddings: torch.Tensor, extra: ExtraItems) -> CandidateBlock:
        count = extra.num_samples
        ids = extra.ids[:count]
        log_q = torch.zeros(count, device=ids.device)
        if self.estimator is not None:
            log_q = extra.sample_log_prob + math.log(count)
        return CandidateBlock(extra_embeddings[:count], ids, log_q)

    def _memory_block(self, step: int) -> CandidateBlock:
        assert self.memory is not None
        embeddings, ids, _ = self.memory.negatives(step)
        return CandidateBlock(embeddings, ids, self._log_q(ids, int(ids.shape[0])))

    def _log_q(self, ids: torch.Tensor, candidates: int) -> torch.Tensor:
        """log expected count of each id among ``candidates`` in-batch-like draws (0: off)."""
        if self.estimator is None or ids.numel() == 0:
            return torch.zeros(ids.shape[0], device=ids.device)
        global_rows = self.config.data.batch_size * self.env.world_size
        scale = math.log(max(candidates, 1) / global_rows)
        return self.estimator.log_q(ids.clamp_min(0)) + scale

    def _with_hard_negatives(
        self,
        scored: ScoredCandidates,
        user: torch.Tensor,
        extra_embeddings: torch.Tensor,
        extra: ExtraItems,
        batch: Batch,
    ) -> ScoredCandidates:
        """Appends each row's own hard negatives: [B, N] -> [B, N + K_imp + K_mined]."""
        start = extra.num_samples
        parts = [scored]
        sources = (
            (extra.impressions, self.config.negatives.impressions.weight),
            (extra.mined, self.config.negatives.mined.weight),
        )
        for ids, weight in sources:
            per_row = ids.shape[1]
            if per_row == 0:
                continue
            block = extra_embeddings[start : start + ids.numel()].view(*ids.shape, -1)
            start += ids.numel()
            valid = (ids >= 0) & (ids != batch.item_ids.unsqueeze(1))
            parts.append(
                ScoredCandidates(
                    positive=scored.positive,
                    negatives=(user.unsqueeze(1) * block).sum(dim=-1),
                    weights=valid.to(user.dtype) * weight,
                    positive_log_q=scored.positive_log_q,
                    negative_log_q=torch.zeros_like(ids, dtype=user.dtype),
                    ids=ids,
                )
            )
        return ScoredCandidates(
            positive=scored.positive,
            negatives=torch.cat([p.negatives for p in parts], dim=1),
            weights=torch.cat([p.weights for p in parts], dim=1),
            positive_log_q=scored.positive_log_q,
            negative_log_q=torch.cat([p.negative_log_q for p in parts], dim=1),
            ids=torch.cat([p.ids for p in parts if p.ids is not None], dim=1),
        )


def _fields(block: CandidateBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return block.embeddings, block.ids, block.log_q


def check_supported(config: ExperimentConfig, manifest: Manifest) -> None:
    """Negative sources the data cannot feed fail at start, naming the keys."""
    negatives = config.negatives
    if negatives.impressions.per_row > 0 and not manifest.schema.has_impression_negatives:
        raise ConfigError(
            f"config key 'negatives.impressions.per_row' = {negatives.impressions.per_row}: "
            f"impression hard negatives need logged impressions, and the data at "
            f"data.path={config.data.path} has no '{IMPRESSION_NEGATIVES}' column "
            "(MovieLens logs ratings only); set negatives.impressions.per_row=0"
        )
    num_items = manifest.splits["items"].rows if "items" in manifest.splits else 0
    if negatives.mined.per_row > 0 and negatives.mined.top_k > num_items:
        raise ConfigError(
            f"config key 'negatives.mined.top_k' = {negatives.mined.top_k} exceeds the "
            f"{num_items} items of data.path={config.data.path}"
        )


def _corpus_sampler(
    config: ExperimentConfig, manifest: Manifest, store: ItemFeatureStore
) -> CorpusSampler | None:
    mixed = config.negatives.mixed
    if mixed.num_samples == 0:
        return None
    corpus = store.corpus_ids()
    if mixed.distribution is CorpusDistribution.UNIFORM:
        return CorpusSampler.uniform(corpus)
    paths = manifest.split_paths(config.data.path, config.data.train_split)
    counts = item_counts(paths, manifest.tables["item_id"])
    return CorpusSampler.unigram(corpus, torch.from_numpy(counts[corpus.numpy()]), mixed.alpha)
