"""Knowledge distillation from the ranker: pure losses over scores, masks and weights.

Pointwise: the logged ranker score of a row, squashed by a sigmoid, is a soft label for an
auxiliary logit of the retrieval model (BCE). Listwise: over each row's candidates (positive,
in-batch and sampled negatives, deduplicated), KL(teacher softmax || student softmax), each side
with its own temperature (Hinton et al. 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.losses import weighted_mean

# Floor of a teacher value before its log (a value of 0 would be -inf for every temperature).
MIN_TEACHER_VALUE = 1e-6


def pointwise_distillation_loss(
    student_logits: torch.Tensor, teacher_scores: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """Binary cross entropy of student logits against sigmoid-normalized teacher scores.

    Args:
        student_logits: [B] auxiliary logits of the retrieval model.
        teacher_scores: [B] logged ranker scores (logit scale); NaN where unknown.
        row_weights: [B] >= 0 (0: padding row).

    Returns:
        scalar: sum_b w_b BCE(sigmoid(s_b) ; sigmoid(r_b)) / sum_b w_b over rows with a finite
        score (0 with a graph when no row has one).
    """
    known = torch.isfinite(teacher_scores)
    targets = torch.sigmoid(torch.where(known, teacher_scores, torch.zeros_like(teacher_scores)))
    per_row = F.binary_cross_entropy_with_logits(student_logits, targets, reduction="none")
    return weighted_mean(per_row, row_weights * known.to(row_weights.dtype))


def first_occurrence_mask(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Which candidates of each row take part: valid, id >= 0, and the first valid column with
    that id in the row (a duplicate would count its item twice in a softmax).

    Args:
        ids: [B, C] int64 item ids, -1 padding.
        valid: [B, C] bool, False for candidates excluded upstream (weight 0).

    Returns:
        [B, C] bool.
    """
    live = valid & (ids >= 0)
    keyed = torch.where(live, ids, torch.full_like(ids, -1))
    ordered, order = keyed.sort(dim=1, stable=True)  # equal ids keep column order
    first = torch.ones_like(live)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    mask = torch.zeros_like(live)
    mask.scatter_(1, order, first)
    return mask & live


def teacher_log_values(values: torch.Tensor) -> torch.Tensor:
    """Teacher logits from non-negative teacher values (a probability or an expected NUV):
    log(max(v, 1e-6)), so that softmax(logits / T) is proportional to v^(1/T).

    Args:
        values: [...] >= 0.

    Returns:
        [...] logits.
    """
    return values.clamp_min(MIN_TEACHER_VALUE).log()


def listwise_distillation_loss(
    student_scores: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    row_weights: torch.Tensor,
    teacher_temperature: float,
    student_temperature: torch.Tensor | float,
) -> torch.Tensor:
    """KL(p_teacher || p_student) over each row's masked candidates.

    p_teacher = softmax(teacher_logits / teacher_temperature), p_student =
    softmax(student_scores / student_temperature), both over the columns where ``mask`` holds.
    The teacher side carries no gradient.

    Args:
        student_scores: [B, C] retrieval scores (inner products, before temperature).
        teacher_logits: [B, C] teacher logits (e.g. :func:`teacher_log_values`).
        mask: [B, C] bool; rows with fewer than 2 candidates contribute nothing.
        row_weights: [B] >= 0.
        teacher_temperature: > 0.
        student_temperature: [] or float > 0 (the retrieval model's, possibly learned).

    Returns:
        scalar: sum_b w_b KL_b / sum_b w_b over rows with >= 2 candidates (0 with a graph when
        there are none).
    """
    floor = torch.finfo(student_scores.dtype).min
    teacher = (teacher_logits.detach() / teacher_temperature).masked_fill(~mask, floor)
    student = (student_scores / student_temperature).masked_fill(~mask, floor)
    teacher_log_p = teacher.log_softmax(dim=1)
    student_log_p = student.log_softmax(dim=1)
    terms = teacher_log_p.exp() * (teacher_log_p - student_log_p)
    per_row = torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=1)
    usable = (mask.sum(dim=1) >= 2).to(row_weights.dtype)
    return weighted_mean(per_row, row_weights * usable)
