"""The light ranking head inside retrieval.

The user tower also emits NU ranker embeddings (a projection of its last hidden layer). For a
candidate item, target-aware attention (softmax over NU of item . nu) pools them into one user
embedding for that item; the features [item embedding, target-aware user embedding, the NU
per-embedding scores item . nu, the retrieval score user . item] go through a small MLP to T
task logits, trained with BCE on the reward labels. At inference the head reranks the items
retrieved by MIPS by its net user value, sigmoid(logits) . label weights.

Gradients: the head's BCE reaches the head MLP, the NU projection, and (through the item
embeddings, the retrieval score and the user tower's hidden layer) the towers and tables:
the head is trained jointly with retrieval. The retrieval loss never reaches the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from config import ExperimentConfig
from data_pipeline.batch import Batch
from models.tower_outputs import TowerOutputs
from models.towers import mlp


def target_aware_attention(
    ranker_user: torch.Tensor, items: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's own view of the user.

    Args:
        ranker_user: [B, NU, D] the user's ranker embeddings.
        items: [B, C, D] candidate item embeddings.
    Returns:
        attended: [B, C, D] softmax over NU of (item . nu) weighting the nu.
        scores: [B, C, NU] the per-embedding scores item . nu.
    """
    scores = torch.einsum("bcd,bnd->bcn", items, ranker_user)
    attended = torch.einsum("bcn,bnd->bcd", scores.softmax(dim=-1), ranker_user)
    return attended, scores


def head_features(
    ranker_user: torch.Tensor, items: torch.Tensor, retrieval_scores: torch.Tensor
) -> torch.Tensor:
    """[item, target-aware user, per-embedding scores, retrieval score].

    Args:
        ranker_user: [B, NU, D]; items: [B, C, D]; retrieval_scores: [B, C] user . item.
    Returns:
        [B, C, 2 D + NU + 1].
    """
    attended, scores = target_aware_attention(ranker_user, items)
    return torch.cat([items, attended, scores, retrieval_scores.unsqueeze(-1)], dim=-1)


def head_net_user_value(logits: torch.Tensor, label_weights: torch.Tensor) -> torch.Tensor:
    """sigmoid(logits) . label weights: logits [..., T], label_weights [T] -> [...]."""
    return torch.sigmoid(logits) @ label_weights.to(logits.dtype)


class LightRankingHead(nn.Module):
    """Args:
    user_hidden_dim: width of the user tower's last hidden layer (its input if it has none).
    embedding_dim: D, the retrieval embedding size (item embeddings and ranker embeddings).
    num_embeddings: NU ranker embeddings per user.
    hidden: the head MLP's hidden widths.
    num_tasks: T reward labels.
    """

    def __init__(
        self,
        user_hidden_dim: int,
        embedding_dim: int,
        num_embeddings: int,
        hidden: Sequence[int],
        num_tasks: int,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.user_projection = nn.Linear(user_hidden_dim, num_embeddings * embedding_dim)
        self.mlp = mlp(2 * embedding_dim + num_embeddings + 1, hidden, num_tasks)

    def project_user(self, user_hidden: torch.Tensor) -> torch.Tensor:
        """user_hidden [B, H] -> ranker embeddings [B, NU, D]."""
        projected = self.user_projection(user_hidden)
        return projected.view(-1, self.num_embeddings, self.embedding_dim)

    def forward(
        self, ranker_user: torch.Tensor, items: torch.Tensor, retrieval_scores: torch.Tensor
    ) -> torch.Tensor:
        """ranker_user [B, NU, D], items [B, C, D], retrieval_scores [B, C] -> logits [B, C, T]."""
        return self.mlp(head_features(ranker_user, items, retrieval_scores))


def training_candidates(
    items: torch.Tensor,
    item_ids: torch.Tensor,
    labels: torch.Tensor,
    row_weight: torch.Tensor,
    negatives_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row b's candidates: its logged item with its labels, then the items of rows b+1..b+k
    (mod B) with every label 0. Batches are shuffled, so the shifted rows are random in-batch
    items. Accidental hits (the row's own item id) and padding rows (weight 0) get mask 0.

    Args:
        items: [B, D] item embeddings of the batch rows; item_ids: [B] int64.
        labels: [B, T] reward labels; row_weight: [B] (0 marks padding rows).
        negatives_per_row: k, 0 <= k < B.
    Returns:
        candidates [B, 1 + k, D], targets [B, 1 + k, T], mask [B, 1 + k] float.
    """
    rows = items.shape[0]
    shifts = torch.arange(negatives_per_row + 1, device=items.device)
    index = (torch.arange(rows, device=items.device).unsqueeze(1) + shifts) % rows  # [B, 1 + k]
    targets = torch.zeros(*index.shape, labels.shape[1], dtype=labels.dtype, device=labels.device)
    targets[:, 0] = labels
    live = (row_weight > 0).to(items.dtype)
    mask = live.unsqueeze(1) * live[index]
    mask[:, 1:] *= (item_ids[index[:, 1:]] != item_ids.unsqueeze(1)).to(items.dtype)
    return items[index], targets, mask


def head_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the labels of the unmasked candidates: logits and targets [B, C, T],
    mask [B, C]. 0 (still attached to ``logits``) when every candidate is masked."""
    losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weights = mask.unsqueeze(-1).expand_as(losses)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def head_module(model: nn.Module) -> LightRankingHead | None:
    """The model's light head; unwraps DistributedModelParallel (``.module``)."""
    inner = getattr(model, "module", model)
    head = getattr(inner, "light_head", None)
    return head if isinstance(head, LightRankingHead) else None


def light_head_loss(
    model: nn.Module, outputs: TowerOutputs, batch: Batch, config: ExperimentConfig
) -> torch.Tensor:
    """``loss_weight`` x the head's BCE on this batch (the training step adds it to the
    retrieval loss); a zero scalar when the head is off."""
    head = head_module(model)
    settings = config.model.light_head
    if head is None or outputs.ranker_user is None or not settings.enabled:
        return outputs.user.new_zeros(())
    candidates, targets, mask = training_candidates(
        outputs.item, batch.item_ids, batch.labels, batch.weight, settings.negatives_per_row
    )
    retrieval_scores = torch.einsum("bcd,bd->bc", candidates, outputs.user)
    logits = head(outputs.ranker_user, candidates, retrieval_scores)
    return settings.loss_weight * head_bce(logits, targets.to(logits.dtype), mask)


@torch.no_grad()
def rerank(
    head: LightRankingHead,
    ranker_user: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_scores: torch.Tensor,
    candidate_items: torch.Tensor,
    label_weights: torch.Tensor,
    num_items: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The retrieved candidates reordered by the head's net user value, top ``num_items`` kept.

    Args:
        ranker_user: [Q, NU, D].
        candidate_ids: [Q, K] int64 retrieved ids in retrieval order, -1 for empty slots.
        candidate_scores: [Q, K] retrieval scores (user . item).
        candidate_items: [Q, K, D] their item embeddings (anything where the id is -1).
        label_weights: [T]; num_items: how many to return (<= K).
    Returns:
        nuv [Q, num_items] float (-inf for empty slots), ids [Q, num_items] int64 (-1 empty);
        ties keep retrieval order.
    """
    scores = torch.where(candidate_ids >= 0, candidate_scores, torch.zeros_like(candidate_scores))
    logits = head(ranker_user, candidate_items, scores.to(candidate_items.dtype))
    nuv = head_net_user_value(logits, label_weights).float()
    nuv = torch.where(candidate_ids >= 0, nuv, torch.full_like(nuv, -torch.inf))
    order = torch.sort(nuv, dim=1, descending=True, stable=True).indices[:, :num_items]
    return nuv.gather(1, order), candidate_ids.gather(1, order)
