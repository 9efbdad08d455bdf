"""The ``distillation`` section: pointwise and listwise knowledge distillation from a ranker."""

from __future__ import annotations

from dataclasses import dataclass, field

from config.errors import Fail


@dataclass
class PointwiseDistillationConfig:
    """Logged ranker scores (the data's ``ranker_score`` column) as soft labels: BCE between
    the retrieval logit of the row's item (score / model temperature) and sigmoid(score)."""

    enabled: bool = False
    weight: float = 1.0


@dataclass
class ListwiseDistillationConfig:
    """A trained ranker (frozen) scores each row's candidates (positive, in-batch, sampled and
    hard negatives); KL between its softmax and retrieval's over the same candidates."""

    enabled: bool = False
    weight: float = 1.0
    # A ranker run directory (its latest checkpoint) or a checkpoints/step-N folder.
    teacher: str | None = None
    # Teacher logits are log(value): at 1 the teacher's distribution is proportional to value.
    teacher_temperature: float = 1.0
    # The teacher's value: a label name (its probability), or null for the expected net user
    # value under loss.label_weights.
    label: str | None = None
    # Negatives per row the teacher scores (random valid ones, plus the positive); null: all.
    # The teacher's cost is B x (1 + this) pairs per step.
    negatives_per_row: int | None = None


@dataclass
class DistillationConfig:
    """Knowledge distillation from the ranker (``models/distillation.py``); auxiliary losses
    added to the retrieval loss, each times its weight."""

    pointwise: PointwiseDistillationConfig = field(default_factory=PointwiseDistillationConfig)
    listwise: ListwiseDistillationConfig = field(default_factory=ListwiseDistillationConfig)


def validate_distillation(distillation: DistillationConfig, fail: Fail) -> None:
    pointwise, listwise = distillation.pointwise, distillation.listwise
    if pointwise.weight < 0:
        fail("distillation.pointwise.weight", "must be >= 0")
    if listwise.weight < 0:
        fail("distillation.listwise.weight", "must be >= 0")
    if listwise.negatives_per_row is not None and listwise.negatives_per_row < 1:
        fail("distillation.listwise.negatives_per_row", "must be >= 1 or null (all candidates)")
    if listwise.teacher_temperature <= 0:
        fail("distillation.listwise.teacher_temperature", "must be > 0")
    if listwise.enabled and not listwise.teacher:
        fail(
            "distillation.listwise.teacher",
            "listwise distillation needs a trained ranker: a run directory of "
            "`twotower train-ranker` or one of its checkpoints/step-N folders",
        )
