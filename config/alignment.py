"""The ``alignment`` section: reward alignment of a trained retrieval model to a ranker."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from config.errors import Fail
from config.negatives import CorpusDistribution
from config.train import TrainConfig, validate_train


def _alignment_loop() -> TrainConfig:
    """200 steps at a small dense rate (the policy starts trained), cycling over epochs."""
    return TrainConfig(epochs=None, max_steps=200, dense_lr=1e-4, sparse_lr=0.01)


class AlignmentMethod(enum.Enum):
    """How rewards on the sampled set become a loss (see the module docstring)."""

    REINFORCE = "reinforce"
    DPO = "dpo"


@dataclass
class AlignmentConfig:
    """Reward alignment (``twotower align``, ``trainer/align.py``, ``models/alignment.py``): the
    retrieval model of ``checkpoint.resume_from`` is the policy, the ranker of
    ``reward_checkpoint`` the frozen reward model (reward = its NUV), and a frozen copy of
    ``reference_checkpoint`` (null: the start checkpoint) the KL reference. Per user and step,
    ``k`` items are scored: the policy's ``top_n`` over the corpus plus ``k - top_n`` drawn from
    the corpus by ``exploration`` (unigram: training counts ** ``exploration_alpha``)."""

    reward_checkpoint: str | None = None
    reference_checkpoint: str | None = None
    k: int = 32
    top_n: int = 16
    exploration: CorpusDistribution = CorpusDistribution.UNIFORM
    exploration_alpha: float = 0.75
    # Weight of the KL(policy || reference) penalty over the sampled sets (both methods).
    kl_coefficient: float = 0.1
    # DPO's beta (method dpo): scale of the log-ratio margins in its logistic loss.
    dpo_beta: float = 1.0
    method: AlignmentMethod = AlignmentMethod.REINFORCE
    # The policy's loop: train.max_steps steps (epochs null: cycling over the train split),
    # dense (AdamW) and fused table learning rates, logging, non-finite policy, schedule.
    train: TrainConfig = field(default_factory=_alignment_loop)
    # Cutoff of the expected-ranker-reward measurement before and after alignment.
    eval_k: int = 10


def validate_alignment(alignment: AlignmentConfig, fail: Fail) -> None:
    if alignment.k < 2:
        fail("alignment.k", "must be >= 2 (a policy over one item has nothing to learn)")
    if not 0 <= alignment.top_n <= alignment.k:
        fail("alignment.top_n", f"must be in [0, alignment.k={alignment.k}]")
    if alignment.exploration_alpha < 0:
        fail("alignment.exploration_alpha", "must be >= 0")
    if alignment.kl_coefficient < 0:
        fail("alignment.kl_coefficient", "must be >= 0")
    if alignment.dpo_beta <= 0:
        fail("alignment.dpo_beta", "must be > 0 (DPO's beta)")
    validate_train(alignment.train, fail, "alignment.train")
    if alignment.eval_k < 1:
        fail("alignment.eval_k", "must be >= 1")
