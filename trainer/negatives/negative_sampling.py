"""Where each training row's negatives come from, and how they are scored.

Per step, in order: :meth:`NegativeSampling.plan` picks the items outside the batch (corpus
samples shared by the batch, impression and mined hard negatives per row) so one forward pass
embeds them with their real features; :meth:`observe` updates the rank-synchronized frequency
estimator; :meth:`score` lays every candidate out per row as
:class:`models.retrieval_loss.ScoredCandidates` with logQ corrections and weights; :meth:`remember`
pushes the step's in-batch items into the cross-batch memory.

logQ correction subtracts from every logit, positive included, the log of its item's expected
count in the whole shared candidate set, the mixture of its sources
(:func:`mixture_log_expected_count`):
``E[count_j] = C_in * p_data(j) + C_mem * p_data(j) + S * p_corpus(j)``, with C_in live
in-batch rows, C_mem live memory entries (past in-batch rows, so the same distribution), S
corpus samples, ``p_data`` the estimator's per-draw probability and ``p_corpus`` the sampler's.
An item gets the same correction in every source it appears in, so the corrected candidate set
estimates the full softmax over the corpus without counting an item once per source. Hard
negatives are not corrected; their config weight counts each as that many negatives.

Cross-batch memory entries are detached copies, so their push never reaches the item tower:
for losses of score differences the item gradients of a row then no longer sum to zero, every
positive pulls its item towards the user with nothing pushing back for the memory's share of
the softmax, all items drift towards the users and the stale copies reward the user tower for
following (the collapse of the memory rows in docs/experiments.md). :func:`routed_memory_scores`
sends each memory column's item gradient to the row's positive instead, so the item tower
learns from the in-batch softmax and the user tower from every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from config import Candidates, ConfigError, ExperimentConfig, LossFamily
from data_pipeline.batch import Batch
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from data_pipeline.negatives import CorpusSampler, CrossBatchMemory
from data_pipeline.schema import IMPRESSION_NEGATIVES
from data_pipeline.streaming_frequency import StreamingFrequencyEstimator
from models.retrieval_loss import ScoredCandidates, sample_valid_columns
from models.tower_outputs import TowerOutputs
from trainer.build import item_store
from trainer.features import ResolvedFeatures
from trainer.negatives.corpus_sources import CorpusCandidates, corpus_sampler
from trainer.negatives.global_negatives import gather_candidates
from trainer.negatives.mined_negatives import CorpusMiner
from trainer.runtime.distributed import DistributedEnv

# Losses of score differences (shift-invariant in the item embeddings), for which a memory
# column's item gradient is routed to the row's positive (see ``routed_memory_scores``).
SCORE_DIFFERENCE_LOSSES = frozenset(
    {LossFamily.SOFTMAX, LossFamily.SAMPLED_SOFTMAX, LossFamily.BPR, LossFamily.TRIPLET}
)


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
    """Candidates shared by every row: embeddings [C, D], ids [C] (-1 padding)."""

    embeddings: torch.Tensor
    ids: torch.Tensor


@dataclass
class SharedCandidates:
    """The candidates shared by every row (in-batch, then corpus samples).

    Args:
        block: embeddings [C, D] and ids [C] (-1 padding).
        in_batch: the in-batch part (for the memory).
        positive_index: [B] int64 column of each row's positive in ``block``.
        log_q: [C] logQ of each candidate against this block alone (0: off).
    """

    block: CandidateBlock
    in_batch: CandidateBlock
    positive_index: torch.Tensor
    log_q: torch.Tensor


@dataclass(frozen=True)
class CandidateSources:
    """Live candidates per source in one step's shared block: in-batch rows, memory entries
    (past in-batch rows), corpus samples."""

    in_batch: int
    memory: int
    corpus: int


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
        corpus: the whole corpus as the shared candidates (None: the batch's items).
    """

    config: ExperimentConfig
    env: DistributedEnv
    store: ItemFeatureStore | None = None
    sampler: CorpusSampler | None = None
    estimator: StreamingFrequencyEstimator | None = None
    memory: CrossBatchMemory | None = None
    miner: CorpusMiner | None = None
    corpus: CorpusCandidates | None = None
    _placeholder: int = field(default=0, repr=False)

    @staticmethod
    def build(
        config: ExperimentConfig,
        manifest: Manifest,
        env: DistributedEnv,
        features: ResolvedFeatures | None = None,
    ) -> NegativeSampling:
        """Loads what the enabled sources need (``features``: the job's resolved features); a
        source the data cannot support is a :class:`ConfigError` naming the keys."""
        negatives = config.negatives
        check_supported(config, manifest)
        whole_corpus = config.loss.candidates is Candidates.CORPUS
        needs_store = (
            negatives.mixed.num_samples > 0
            or negatives.impressions.per_row > 0
            or negatives.mined.per_row > 0
            or whole_corpus
        )
        store = item_store(manifest, config, features) if needs_store else None
        sampler = corpus_sampler(config, manifest, store) if store is not None else None
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
        miner = CorpusMiner(negatives.mined, features) if negatives.mined.per_row > 0 else None
        corpus = CorpusCandidates.build(store, env.device) if whole_corpus and store else None
        placeholder = int(store.corpus_ids()[0]) if store is not None else 0
        return NegativeSampling(
            config, env, store, sampler, estimator, memory, miner, corpus, placeholder
        )

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
        if self.corpus is not None:
            none = torch.full((rows, 0), -1, dtype=torch.int64, device=device)
            zeros = torch.zeros(self.corpus.ids.shape[0], device=device)
            return ExtraItems(self.corpus.ids, zeros, none, none)
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
        if self.corpus is not None:
            return self.corpus.features
        ids = torch.where(extra.ids >= 0, extra.ids, torch.full_like(extra.ids, self._placeholder))
        return self.store.lookup(ids.cpu()).to(self.env.device)

    def observe(self, batch: Batch, step: int) -> None:
        """Feeds the global batch's item ids to the frequency estimator (collective)."""
        if self.estimator is None:
            return
        live = torch.where(batch.weight > 0, batch.item_ids, torch.full_like(batch.item_ids, -1))
        self.estimator.update_synchronized(live[live >= 0], step)

    def shared(
        self, outputs: TowerOutputs, batch: Batch, extra: ExtraItems | None
    ) -> SharedCandidates:
        """The candidates every row scores against, before the memory: in-batch items (every
        rank's with ``loss.global_negatives``) and corpus samples, with their logQ."""
        fresh, in_batch, positive_index, sources = self._fresh(outputs, batch, extra)
        return SharedCandidates(fresh, in_batch, positive_index, self._log_q(fresh.ids, sources))

    def _fresh(
        self, outputs: TowerOutputs, batch: Batch, extra: ExtraItems | None
    ) -> tuple[CandidateBlock, CandidateBlock, torch.Tensor, CandidateSources]:
        """This step's shared candidates (in-batch, then corpus samples), the in-batch part,
        each row's positive column [B] and the live count per source (memory 0)."""
        positive_ids = batch.item_ids
        if self.corpus is not None and extra is not None:
            block = CandidateBlock(outputs.extra_items, self.corpus.ids)
            sources = CandidateSources(0, 0, int(self.corpus.ids.shape[0]))
            return block, block, self.corpus.columns(positive_ids), sources
        # Padding rows (weight 0, a rank out of data) are no one's negatives.
        candidate_ids = torch.where(
            batch.weight > 0, positive_ids, torch.full_like(positive_ids, -1)
        )
        in_batch, positive_index = self._in_batch(outputs.item, candidate_ids)
        blocks = [in_batch]
        samples = extra.num_samples if extra is not None else 0
        if extra is not None and samples > 0:
            blocks.append(self._corpus_samples(outputs.extra_items, extra))
        fresh = CandidateBlock(
            torch.cat([block.embeddings for block in blocks]),
            torch.cat([block.ids for block in blocks]),
        )
        sources = CandidateSources(int((in_batch.ids >= 0).sum()), 0, samples)
        return fresh, in_batch, positive_index, sources

    def uses_shared_softmax(self, extra: ExtraItems | None) -> bool:
        """Whether the step's loss is the softmax over the shared candidates alone, scored in
        linear memory by :func:`models.blocked_softmax.shared_softmax_loss`."""
        return self.config.loss.family is LossFamily.SOFTMAX and self._shared_only(extra)

    def uses_drawn_columns(self, extra: ExtraItems | None) -> bool:
        """Whether the step's loss keeps ``loss.negatives_per_row`` drawn negatives of the
        shared candidates alone, so :meth:`score_drawn` scores only the drawn columns."""
        loss = self.config.loss
        return (
            loss.negatives_per_row is not None
            and loss.family is not LossFamily.SOFTMAX
            and self._shared_only(extra)
        )

    def _shared_only(self, extra: ExtraItems | None) -> bool:
        """Whether every row's candidates are the shared ones alone: no memory, no per-row hard
        negatives, and no listwise distillation (which reads the per-row layout anyway, so it
        is built once)."""
        hard = extra is not None and extra.ids.shape[0] > extra.num_samples
        listwise = self.config.distillation.listwise.enabled
        return self.memory is None and not hard and not listwise

    def score_drawn(
        self,
        outputs: TowerOutputs,
        batch: Batch,
        extra: ExtraItems | None,
        count: int,
        generator: torch.Generator,
    ) -> tuple[ScoredCandidates, CandidateBlock]:
        """``count`` negatives per row drawn from the shared candidates and scored alone:
        O(B * count * D) instead of the [B, C] layout of :meth:`score`, and the same draws as
        :meth:`score` followed by :func:`models.retrieval_loss.sample_negative_columns` (same
        generator state, same validity: padding, the row's positive column and, with
        ``loss.mask_accidental_hits``, its positive's id). Returns [B, count] scores and the
        in-batch block."""
        shared = self.shared(outputs, batch, extra)
        ids, positive_index = shared.block.ids, shared.positive_index
        positive_ids = batch.item_ids
        mask_hits = self.config.loss.mask_accidental_hits

        def is_valid(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            return valid_negatives(
                ids[columns], columns, positive_index[rows], positive_ids[rows], mask_hits
            )

        index, valid = sample_valid_columns(
            positive_ids.shape[0], ids.shape[0], count, is_valid, generator, ids.device
        )
        user = outputs.user
        embeddings = shared.block.embeddings[index]  # [B, k, D]
        scored = ScoredCandidates(
            positive=(user * outputs.item).sum(dim=1),
            negatives=torch.bmm(embeddings, user.unsqueeze(2)).squeeze(2),
            weights=valid.to(user.dtype),
            positive_log_q=shared.log_q[positive_index],
            negative_log_q=shared.log_q[index],
            ids=ids[index],
        )
        return scored, shared.in_batch

    def score(
        self, outputs: TowerOutputs, batch: Batch, extra: ExtraItems | None, step: int
    ) -> tuple[ScoredCandidates, CandidateBlock]:
        """Every row's positive and negatives laid out per row [B, N]. Returns the scores and
        the in-batch block (for :meth:`remember`)."""
        user, item = outputs.user, outputs.item
        positive_ids = batch.item_ids
        fresh, in_batch, positive_index, fresh_sources = self._fresh(outputs, batch, extra)
        memory = self._memory_block(step, item)
        shared_ids = torch.cat([fresh.ids, memory.ids])
        if self.config.loss.family in SCORE_DIFFERENCE_LOSSES:
            memory_scores = routed_memory_scores(user, memory.embeddings, item)
        else:  # pointwise losses: a memory term simply has no item-side gradient
            memory_scores = user @ memory.embeddings.T
        negatives = torch.cat([user @ fresh.embeddings.T, memory_scores], dim=1)
        sources = CandidateSources(
            fresh_sources.in_batch, int((memory.ids >= 0).sum()), fresh_sources.corpus
        )
        shared_log_q = self._log_q(shared_ids, sources)
        columns = torch.arange(shared_ids.shape[0], device=shared_ids.device)
        valid = valid_negatives(
            shared_ids.unsqueeze(0),
            columns.unsqueeze(0),
            positive_index,
            positive_ids,
            self.config.loss.mask_accidental_hits,
        )
        weights = valid.to(user.dtype)
        log_q = shared_log_q.expand_as(negatives)
        scored = ScoredCandidates(
            positive=(user * item).sum(dim=1),
            negatives=negatives,
            weights=weights,
            positive_log_q=shared_log_q[positive_index],
            negative_log_q=log_q,
            ids=shared_ids.expand_as(negatives),
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
        return CandidateBlock(embeddings, ids), positive_index

    def _corpus_samples(self, extra_embeddings: torch.Tensor, extra: ExtraItems) -> CandidateBlock:
        ids = extra.ids[: extra.num_samples]
        return CandidateBlock(extra_embeddings[: extra.num_samples], ids)

    def _memory_block(self, step: int, like: torch.Tensor) -> CandidateBlock:
        """The memory's entries [M, D] like ``like`` (detached; M = 0 without memory or during
        its warmup)."""
        if self.memory is None:
            ids = torch.zeros(0, dtype=torch.int64, device=like.device)
            return CandidateBlock(like.detach()[:0], ids)
        embeddings, ids, _ = self.memory.negatives(step)
        return CandidateBlock(embeddings.to(like.dtype), ids)

    def _log_q(self, ids: torch.Tensor, sources: CandidateSources) -> torch.Tensor:
        """[C] log expected count of each candidate id in the whole candidate set (0: off)."""
        live = ids >= 0
        if self.estimator is None or not bool(live.any()):
            return _no_log_q(ids)
        known = ids.clamp_min(0)
        draws = [float(sources.in_batch + sources.memory)]
        log_probs = [self.estimator.log_probability(known).to(ids.device)]
        if sources.corpus > 0 and self.sampler is not None:
            draws.append(float(sources.corpus))
            log_probs.append(self.sampler.log_prob(known, strict=False).to(ids.device))
        log_q = mixture_log_expected_count(draws, log_probs)
        # Padding columns carry weight 0 but must stay finite (-inf - -inf would be nan).
        return torch.where(live, log_q, torch.zeros_like(log_q))

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


def valid_negatives(
    candidate_ids: torch.Tensor,
    columns: torch.Tensor,
    positive_index: torch.Tensor,
    positive_ids: torch.Tensor,
    mask_accidental_hits: bool,
) -> torch.Tensor:
    """Which candidates may be negatives of their row: not padding (id -1), not the row's own
    positive column and, with ``mask_accidental_hits``, not its positive's id.

    Args:
        candidate_ids: [B, m] or [1, m] ids of the candidates (broadcast over rows).
        columns: the same shape, their columns in the shared block.
        positive_index: [B] each row's positive column.
        positive_ids: [B] each row's positive id.
        mask_accidental_hits: also drop candidates with the positive's id.
    Returns:
        [B, m] bool.
    """
    valid = (candidate_ids >= 0) & (columns != positive_index.unsqueeze(1))
    if mask_accidental_hits:
        valid = valid & (candidate_ids != positive_ids.unsqueeze(1))
    return valid


def _no_log_q(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ids.shape[0], device=ids.device)


def mixture_log_expected_count(
    draws: Sequence[float], log_probs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """log of each item's expected count in a candidate set concatenated from several sources.

    Source s contributes ``draws[s]`` candidates, each independently item j with probability
    ``p_s(j)``, so ``E[count_j] = sum_s draws[s] * p_s(j)`` (a logsumexp, stable for tiny p).

    Args:
        draws: [S] candidates per source, >= 0 (a source with 0 draws adds nothing).
        log_probs: S tensors [n], log p_s of the same n items under each source (-inf: the
            source never draws that item).
    Returns:
        [n] float32 log E[count_j]; -inf for an item no source can draw.
    Raises:
        ValueError: lengths differ, a count is negative, or no source has draws.
    """
    if len(draws) != len(log_probs):
        raise ValueError(f"{len(draws)} draw counts for {len(log_probs)} sources")
    if any(count < 0 for count in draws):
        raise ValueError(f"draw counts must be >= 0, got {list(draws)}")
    terms = [math.log(count) + lp.float() for count, lp in zip(draws, log_probs) if count > 0]
    if not terms:
        raise ValueError("no source has draws: the candidate set is empty")
    return torch.logsumexp(torch.stack(terms), dim=0)


def routed_memory_scores(
    user: torch.Tensor, memory: torch.Tensor, positive_item: torch.Tensor
) -> torch.Tensor:
    """Scores of detached memory entries whose item-side gradient goes to each row's positive.

    A loss of score differences (softmax, BPR, triplet, the distillation KL) is unchanged when
    every item embedding moves by one vector, so the item gradients of a row sum to zero. A
    detached memory column breaks that: its push never reaches an item, and the item tower is
    left with the pull of every positive, so all items drift towards the users (and stale copies
    then reward the user tower for following the drift). Adding
    ``u.detach() . i+  -  (u . i+).detach()`` (zero) to each memory score sends the push a
    column puts on its item to the row's positive instead: for the softmax, the item tower then
    gets exactly the in-batch softmax's gradient, scaled by one minus the memory's softmax mass,
    and the user tower the gradient of the whole candidate set.

    Args:
        user: [B, D] user embeddings.
        memory: [M, D] detached memory embeddings.
        positive_item: [B, D] each row's positive item embedding.
    Returns:
        [B, M] ``user @ memory.T`` in value.
    """
    positive = (user.detach() * positive_item).sum(dim=1)
    routed = positive - (user * positive_item).sum(dim=1).detach()
    return user @ memory.T + routed.unsqueeze(1)


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
