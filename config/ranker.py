"""The ``ranker`` section: the ranking model used as teacher and reward model."""

from __future__ import annotations

from dataclasses import dataclass, field

from config.errors import Fail
from config.train import TrainConfig, validate_train


@dataclass
class RankerConfig:
    """The ranking model (``models/ranker.py``, ``twotower train-ranker``): every user and item
    feature pooled from its own tables -> DCN-v2 low-rank cross layers -> MLP -> one logit per
    label, trained with per-label BCE. Its loop (epochs, learning rates, optimizers, logging)
    is ``ranker.train``, of the retrieval ``train`` section's shape; NUV weights come from
    ``loss.label_weights``."""

    embedding_dim: int = 32
    cross_layers: int = 3
    low_rank: int = 16
    mlp: list[int] = field(default_factory=lambda: [256, 128])
    # Random corpus items per logged row, paired with the row's user, every label 0 (uniform
    # over items/). Needed where every logged row is a positive (MovieLens): without them the
    # ranker never sees a pair the user did not engage with. Also applied to the eval split.
    sampled_negatives: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)


def validate_ranker(ranker: RankerConfig, fail: Fail) -> None:
    if ranker.embedding_dim < 1:
        fail("ranker.embedding_dim", "must be >= 1")
    if ranker.cross_layers < 0:
        fail("ranker.cross_layers", "must be >= 0 (0: MLP only)")
    if ranker.low_rank < 1:
        fail("ranker.low_rank", "must be >= 1")
    if any(width < 1 for width in ranker.mlp):
        fail("ranker.mlp", f"hidden widths must be >= 1, got {ranker.mlp}")
    if ranker.sampled_negatives < 0:
        fail("ranker.sampled_negatives", "must be >= 0")
    validate_train(ranker.train, fail, "ranker.train")
