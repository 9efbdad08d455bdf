"""The ``loss`` section: net user value, the loss family and its negatives per row."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from config.errors import Fail


class LossFamily(enum.Enum):
    """How a row's positive is scored against its negatives (see ``models.losses``).

    ``softmax``: listwise softmax over every candidate (in-batch plus every extra negative).
    ``sampled_softmax``: listwise softmax over 1 positive + ``loss.negatives_per_row`` negatives.
    ``sigmoid``: pointwise binary cross entropy (positive 1, negatives 0).
    ``cosine``: pointwise regression of cosines to +1 / -1 at ratio 1:``negatives_per_row``.
    ``triplet``: pairwise hinge with ``loss.margin``.
    ``bpr``: pairwise logistic (triplet logistic / BPR).
    ``logged_bce``: pointwise binary cross entropy of each row's own score against its logged
    label (engaged: net user value > 0); unengaged impressions are the negatives, no candidates
    are scored (the objective of TorchRec's retrieval example).
    """

    SOFTMAX = "softmax"
    SAMPLED_SOFTMAX = "sampled_softmax"
    SIGMOID = "sigmoid"
    COSINE = "cosine"
    TRIPLET = "triplet"
    BPR = "bpr"
    LOGGED_BCE = "logged_bce"


class Candidates(enum.Enum):
    """The shared candidates every row is scored against.

    ``batch``: the batch's own items (plus any configured extra negatives).
    ``corpus``: every item of the corpus, through the item tower each step, and nothing else:
    the full softmax of SASRec+ (no sampling, so no logQ correction), for corpora small enough
    to embed every step.
    """

    BATCH = "batch"
    CORPUS = "corpus"


@dataclass
class LossConfig:
    # Net user value = labels . label_weights, clamped at 0; rows with zero value give no signal.
    label_weights: dict[str, float] = field(default_factory=lambda: {"click": 1.0})
    mask_accidental_hits: bool = True
    # Negatives from every rank's batch (differentiable all-gather), not only this rank's.
    global_negatives: bool = False
    family: LossFamily = LossFamily.SOFTMAX
    # Negatives per row for sampled_softmax / pointwise / pairwise (drawn from the row's
    # candidates); null uses every candidate. ``cosine`` needs it (the 1:k ratio).
    negatives_per_row: int | None = None
    margin: float = 0.2
    # Rows scored at a time by the shared-candidate softmax: its extra memory is
    # block_rows x candidates floats.
    block_rows: int = 1024
    candidates: Candidates = Candidates.BATCH


def validate_loss(loss: LossConfig, fail: Fail) -> None:
    if not loss.label_weights:
        fail("loss.label_weights", "name at least one label")
    per_row = loss.negatives_per_row
    if per_row is not None and per_row < 1:
        fail("loss.negatives_per_row", "must be >= 1 or null (all candidates)")
    if loss.family in (LossFamily.COSINE, LossFamily.SAMPLED_SOFTMAX) and per_row is None:
        fail(
            "loss.negatives_per_row",
            f"loss.family={loss.family.value} needs the number of negatives per row "
            "(the positive:negative ratio)",
        )
    if loss.family is LossFamily.SOFTMAX and per_row is not None:
        fail(
            "loss.negatives_per_row",
            "loss.family=softmax uses every candidate; use loss.family=sampled_softmax "
            "to sample negatives per row",
        )
    if loss.family is LossFamily.LOGGED_BCE and per_row is not None:
        fail(
            "loss.negatives_per_row",
            "loss.family=logged_bce scores each row's own item only (its logged label); "
            "set loss.negatives_per_row=null",
        )
    if loss.block_rows < 1:
        fail("loss.block_rows", "must be >= 1")
    if loss.margin < 0:
        fail("loss.margin", "must be >= 0")
