"""Distillation from the ranker during retrieval training.

Built once per process (:meth:`Distillation.build`); each step adds
:meth:`Distillation.loss` to the retrieval loss:

- pointwise: the retrieval logit of each row's own item, ``s(u, i+) / temperature`` (the logit the
  softmax uses; no new parameters, so nothing extra to checkpoint or synchronize), against
  ``sigmoid(ranker_score)`` of the logged ranker score, by BCE. The softmax only sees score
  differences within a row; this term also orders rows against each other the way the ranker
  did. Rows with a NaN score are left out.
- listwise: the frozen teacher (one unsharded replica per process, so scoring needs no
  collectives) scores every row's candidates ``[positive, in-batch, corpus samples, memory, hard
  negatives]``, the columns of :class:`ScoredCandidates` with weight > 0, each item once; KL
  between the teacher's softmax and retrieval's softmax over them. Retrieval's side uses raw
  scores over the model temperature, without logQ corrections: the teacher has no sampling bias
  to undo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torchrec import KeyedJaggedTensor

from config import ConfigError, DistillationConfig, ExperimentConfig
from data_pipeline.batch import Batch
from data_pipeline.derived import RECENT_HISTORY
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import MANIFEST_NAME, Manifest
from models.distillation import (
    first_occurrence_mask,
    listwise_distillation_loss,
    pointwise_distillation_loss,
    teacher_log_values,
)
from models.ranker import PAIR_CHUNK, Ranker, expected_net_user_value
from models.retrieval_loss import ScoredCandidates, sample_negative_columns
from models.two_tower import select_keys
from trainer.build import label_weights
from trainer.ranker_build import load_ranker, ranker_run_config
from trainer.runtime.distributed import DistributedEnv

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Each row's distillation candidates.

    Args:
        scores: [B, 1 + N] retrieval scores (positive first, before temperature).
        ids: [B, 1 + N] int64 item ids.
        mask: [B, 1 + N] bool: valid, and the first column with its id in the row.
    """

    scores: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


def row_candidates(
    batch: Batch,
    scored: ScoredCandidates,
    negatives_per_row: int | None = None,
    generator: torch.Generator | None = None,
) -> Candidates:
    """The positive (live rows only) and the negatives with weight > 0, deduplicated; with
    ``negatives_per_row``, that many of those negatives per row, uniformly at random (the
    duplicates of a drawn item are dropped before the draw)."""
    if scored.ids is None:
        raise ValueError("listwise distillation needs ScoredCandidates.ids (candidate item ids)")
    if negatives_per_row is not None:
        unique = first_occurrence_mask(scored.ids, scored.weights > 0)
        index, drawn = sample_negative_columns(unique.float(), negatives_per_row, generator)
        scored = scored.select(index, drawn)
    assert scored.ids is not None
    ids = torch.cat([batch.item_ids.unsqueeze(1), scored.ids], dim=1)
    valid = torch.cat([(batch.weight > 0).unsqueeze(1), scored.weights > 0], dim=1)
    scores = torch.cat([scored.positive.unsqueeze(1), scored.negatives], dim=1)
    return Candidates(scores, ids, first_occurrence_mask(ids, valid))


@dataclass
class Distillation:
    """Distillation losses of one process.

    Args:
        config: the ``distillation`` section.
        teacher: the frozen ranker (None: listwise off).
        store: item features of candidate ids (None: listwise off).
        value_weights: [T] teacher value = sigmoid(logits) . value_weights (one-hot for a label,
            ``loss.label_weights`` for net user value).
    """

    config: DistillationConfig
    teacher: Ranker | None = None
    store: ItemFeatureStore | None = None
    value_weights: torch.Tensor | None = None

    @staticmethod
    def build(
        config: ExperimentConfig, manifest: Manifest, env: DistributedEnv
    ) -> Distillation | None:
        """None when no distillation is on. Loads the teacher (collective when a process group
        exists: every rank builds). Raises :class:`ConfigError` naming the key when the data or
        the teacher cannot support the configuration."""
        section = config.distillation
        if not (section.pointwise.enabled or section.listwise.enabled):
            return None
        if section.pointwise.enabled and not manifest.schema.has_ranker_score:
            raise ConfigError(
                "config key 'distillation.pointwise.enabled': pointwise distillation needs "
                f"logged ranker scores, and {manifest_path(config)} has no 'ranker_score' "
                "column (MovieLens logs none); use distillation.listwise with a trained ranker"
            )
        if not section.listwise.enabled:
            return Distillation(section)
        weights = teacher_value_weights(config, manifest).to(env.device)
        assert section.listwise.teacher is not None  # validated with the config
        check_teacher_features(config, manifest, section.listwise.teacher)
        teacher = load_ranker(section.listwise.teacher, manifest).to(env.device)
        # The ranker's own item side: every stored item feature, as it was trained on.
        store = ItemFeatureStore.load(config.data.path, manifest)
        logger.info("distillation teacher %s", section.listwise.teacher)
        return Distillation(section, teacher, store, weights)

    def loss(
        self,
        batch: Batch,
        positive: torch.Tensor,
        scored: ScoredCandidates | None,
        temperature: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Weighted sum of the enabled terms (scalar).

        Args:
            batch: the step's batch (B rows).
            positive: [B] each row's score with its own item.
            scored: its candidates as the retrieval loss saw them (needed by listwise only).
            temperature: [] the retrieval model's temperature.
            generator: the step's seeded generator (``listwise.negatives_per_row`` draws).
        """
        total = positive.new_zeros(())
        pointwise, listwise = self.config.pointwise, self.config.listwise
        if pointwise.enabled:
            logits = positive / temperature
            term = pointwise_distillation_loss(logits, batch.ranker_score, batch.weight)
            total = total + pointwise.weight * term
        if listwise.enabled:
            if scored is None:
                raise ValueError("listwise distillation needs the per-row candidate layout")
            candidates = row_candidates(batch, scored, listwise.negatives_per_row, generator)
            teacher = self.teacher_logits(batch.user_features, candidates.ids, candidates.mask)
            term = listwise_distillation_loss(
                candidates.scores,
                teacher,
                candidates.mask,
                batch.weight,
                listwise.teacher_temperature,
                temperature,
            )
            total = total + listwise.weight * term
        return total

    @torch.no_grad()
    def teacher_logits(
        self, user_features: KeyedJaggedTensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher logits log(value) of (user row b, item ids[b, c]) where ``mask`` holds.

        One embedding lookup per side (users [B], distinct items), then the teacher's
        interaction layers over the masked pairs only, in chunks.

        Args:
            user_features: KJT, stride B (any superset of the teacher's user keys).
            ids: [B, C] int64 item ids.
            mask: [B, C] bool.

        Returns:
            [B, C] float; masked-out entries are 0 (callers mask them).
        """
        teacher, store, weights = self.teacher, self.store, self.value_weights
        assert teacher is not None and store is not None and weights is not None
        logits = torch.zeros(ids.shape, device=ids.device)
        wanted = ids[mask]
        if wanted.numel() == 0:
            return logits
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)[mask]
        distinct, column = torch.unique(wanted, return_inverse=True)
        items = store.lookup(distinct.cpu()).to(ids.device)
        user = teacher.user_inputs(select_keys(user_features, teacher.user_feature_names))
        item = teacher.item_inputs(select_keys(items, teacher.item_feature_names))
        pair_values = []
        for start in range(0, wanted.shape[0], PAIR_CHUNK):
            chunk = slice(start, start + PAIR_CHUNK)
            pair_logits = teacher.interact(user[rows[chunk]], item[column[chunk]])
            pair_values.append(expected_net_user_value(pair_logits, weights))
        logits[mask] = teacher_log_values(torch.cat(pair_values))
        return logits


def manifest_path(config: ExperimentConfig) -> str:
    return f"data.path={config.data.path} ({config.data.path}/{MANIFEST_NAME})"


def teacher_value_weights(config: ExperimentConfig, manifest: Manifest) -> torch.Tensor:
    """[T] weights of sigmoid(teacher logits): one-hot for ``distillation.listwise.label``,
    ``loss.label_weights`` for null (net user value)."""
    label = config.distillation.listwise.label
    labels = list(manifest.schema.labels)
    if label is None:
        return label_weights(manifest, config)
    if label not in labels:
        raise ConfigError(
            f"config key 'distillation.listwise.label': {label!r} is not a label of "
            f"{manifest_path(config)} (have {labels}; null: net user value)"
        )
    return torch.nn.functional.one_hot(torch.tensor(labels.index(label)), len(labels)).float()


def check_teacher_features(config: ExperimentConfig, manifest: Manifest, teacher: str) -> None:
    """The teacher's derived user feature must be computed as it was in the ranker's training.
    (Its stored user features ride along in the training batch: ``trainer.build``'s loader reads
    the union of the student's and the teacher's.)"""
    teacher_config = ranker_run_config(teacher)
    ranker_history = teacher_config.data.recent_history
    if ranker_history > 0 and ranker_history != config.data.recent_history:
        raise ConfigError(
            f"config key 'data.recent_history' = {config.data.recent_history}: the teacher "
            f"(distillation.listwise.teacher={teacher}) was trained with "
            f"data.recent_history={ranker_history}; the retrieval batch must derive the same "
            f"'{RECENT_HISTORY}' feature"
        )
