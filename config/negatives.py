"""The ``negatives`` section: logQ correction, corpus samples, cross-batch memory and hard
negatives."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from config.errors import Fail


class CorpusDistribution(enum.Enum):
    """Distribution of negatives drawn from the item corpus."""

    UNIFORM = "uniform"
    UNIGRAM = "unigram"


@dataclass
class LogQConfig:
    """Sampling-bias correction (Yi et al. 2019): every logit, the positive's included, gets
    ``- log`` of its item's expected count in the whole shared candidate set, summed over its
    sources: ``(C_in + C_mem) * p_data(j) + S * p_corpus(j)`` for C_in in-batch rows, C_mem
    memory entries and S corpus samples. ``p_data`` (per row, uncapped, so a head item can
    expect many copies) comes from a streaming, rank-synchronized count-min sketch of
    ``num_hashes`` x ``hash_size`` decayed counts, ``alpha`` the decay per step; ``p_corpus``
    is the corpus sampler's known probability."""

    enabled: bool = False
    hash_size: int = 1 << 20
    num_hashes: int = 2
    alpha: float = 0.01


@dataclass
class MixedNegativesConfig:
    """Mixed negative sampling (Yang et al. 2020): ``num_samples`` corpus items per step shared by
    the batch, run through the item tower with their real features. With logQ correction on,
    every candidate's logit gets ``- log`` of its item's expected count in the whole candidate
    set, in which the samples count ``num_samples * p(item)`` (``LogQConfig``)."""

    num_samples: int = 0
    distribution: CorpusDistribution = CorpusDistribution.UNIGRAM
    alpha: float = 0.75


@dataclass
class MemoryConfig:
    """Cross-batch memory: a FIFO of recent in-batch item embeddings (detached, duplicates
    kept) reused as negatives. For losses of score differences each memory column's item
    gradient goes to the row's positive, so the item tower still learns from a balanced
    softmax; with logQ on, entries share the in-batch items' mixture correction."""

    size: int = 0
    warmup_steps: int = 100
    max_staleness_steps: int = 50


@dataclass
class HardNegativesConfig:
    """Row-specific hard negatives. ``per_row`` is their share (how many per positive row);
    ``weight`` is how many ordinary negatives each counts as (log-weight in the softmax)."""

    per_row: int = 0
    weight: float = 1.0


@dataclass
class MinedNegativesConfig(HardNegativesConfig):
    """Semi-hard negatives from the model's own top-K over the corpus, skipping the top few
    (Facebook EBR), mined against corpus embeddings refreshed every ``refresh_every_steps``."""

    top_k: int = 100
    skip_top: int = 10
    refresh_every_steps: int = 200


@dataclass
class NegativesConfig:
    log_q: LogQConfig = field(default_factory=LogQConfig)
    mixed: MixedNegativesConfig = field(default_factory=MixedNegativesConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Items shown to the same user in the same request and not engaged (needs the data column).
    impressions: HardNegativesConfig = field(default_factory=HardNegativesConfig)
    mined: MinedNegativesConfig = field(default_factory=MinedNegativesConfig)


def validate_negatives(negatives: NegativesConfig, fail: Fail) -> None:
    log_q, mixed, memory, mined = (
        negatives.log_q,
        negatives.mixed,
        negatives.memory,
        negatives.mined,
    )
    if log_q.hash_size < 1 or log_q.hash_size & (log_q.hash_size - 1) or log_q.hash_size > 1 << 31:
        fail("negatives.log_q.hash_size", "must be a power of two, at most 2**31")
    if log_q.num_hashes < 1:
        fail("negatives.log_q.num_hashes", "must be >= 1")
    if not 0 < log_q.alpha <= 1:
        fail("negatives.log_q.alpha", "must be in (0, 1]")
    if mixed.num_samples < 0:
        fail("negatives.mixed.num_samples", "must be >= 0")
    if mixed.alpha < 0:
        fail("negatives.mixed.alpha", "must be >= 0")
    if memory.size < 0 or memory.warmup_steps < 0:
        fail("negatives.memory.size", "size and warmup_steps must be >= 0")
    if memory.size > 0 and memory.max_staleness_steps < 1:
        fail("negatives.memory.max_staleness_steps", "must be >= 1 when negatives.memory.size > 0")
    for name, hard in (("impressions", negatives.impressions), ("mined", mined)):
        if hard.per_row < 0:
            fail(f"negatives.{name}.per_row", "must be >= 0")
        if hard.weight <= 0:
            fail(f"negatives.{name}.weight", "must be > 0")
    if mined.per_row > 0:
        if mined.skip_top < 0 or mined.top_k <= mined.skip_top:
            fail(
                "negatives.mined.top_k",
                f"must exceed negatives.mined.skip_top ({mined.skip_top}) so there is a "
                "semi-hard band to sample from",
            )
        if mined.top_k - mined.skip_top < mined.per_row:
            fail(
                "negatives.mined.per_row",
                f"at most negatives.mined.top_k - negatives.mined.skip_top "
                f"({mined.top_k - mined.skip_top}) distinct items per row",
            )
        if mined.refresh_every_steps < 1:
            fail("negatives.mined.refresh_every_steps", "must be >= 1")
