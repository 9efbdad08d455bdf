"""The ranking model: a pointwise multi-task DCN-v2 ranker over user, item and cross features.

It is the teacher (distillation) and the reward model (alignment) of the retrieval model, so it
scores ANY (user, item) pair, not only logged ones:

    pooled embeddings of every user and item feature (one TorchRec EmbeddingBagCollection)
      -> x0 = concat(user features, item features)            [P, F]
      -> low-rank cross layers  x_{l+1} = x0 * (W_l V_l x_l + b_l) + x_l   (explicit crosses)
      -> MLP -> T logits, one per reward label in ``manifest.schema.labels``

The user and item halves of x0 are computed by separate lookups when needed, so one user can be
scored against a whole corpus with a single lookup per side (:meth:`Ranker.score_items`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.modules.crossnet import LowRankCrossNet

from config import RankerConfig
from data_pipeline.schema import EventSchema
from models.kjt_ops import select_keys, stack_rows, without_weights
from models.losses import weighted_mean
from models.towers import mlp, table_configs

# Pairs per interaction chunk in ``score_items``: bounds the [chunk, F] activations.
PAIR_CHUNK = 65_536


def empty_features(keys: Sequence[str], like: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A KJT with ``keys``, the stride of ``like``, every bag empty (dtypes, device of ``like``;
    weighted when ``like`` is, so that the two concatenate)."""
    rows = like.stride()
    lengths = like.lengths()
    weights = like.weights_or_none()
    return KeyedJaggedTensor(
        keys=list(keys),
        values=like.values().new_zeros(0),
        weights=None if weights is None else weights.new_zeros(0),
        lengths=lengths.new_zeros(len(keys) * rows),
        stride=rows,
    )


def expected_net_user_value(logits: torch.Tensor, label_weights: torch.Tensor) -> torch.Tensor:
    """NUV under the ranker: sigmoid(logits) . label_weights.

    Args:
        logits: [..., T] ranker logits.
        label_weights: [T] value of each label (``loss.label_weights`` in label order).

    Returns:
        [...] expected net user value of each pair.
    """
    return (torch.sigmoid(logits) * label_weights).sum(dim=-1)


def ranker_bce_loss(
    logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """Per-label binary cross entropy, averaged over the T labels, weighted over rows.

    Args:
        logits: [P, T] ranker logits.
        labels: [P, T] in [0, 1].
        row_weights: [P] >= 0 (0 for padding rows and accidental-hit negatives).

    Returns:
        scalar: sum_p w_p * mean_t BCE_pt / sum_p w_p (0 with a graph when all weights are 0).
    """
    per_entry = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return weighted_mean(per_entry.mean(dim=1), row_weights)


class Ranker(nn.Module):
    """Args:
    schema: model-facing event schema (features per side, labels).
    tables: table name -> rows, from the manifest.
    config: the ``ranker`` section.
    label_weights: [T] NUV weight of each label (not saved with the weights: a caller may
        value labels differently from the run that trained the ranker).
    device: where the embedding tables are created (``meta`` before sharding).
    """

    def __init__(
        self,
        schema: EventSchema,
        tables: dict[str, int],
        config: RankerConfig,
        label_weights: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.labels = tuple(schema.labels)
        self.user_feature_names = [f.name for f in schema.user_features()]
        self.item_feature_names = [f.name for f in schema.item_features()]
        configs = table_configs(schema.features, tables, config.embedding_dim, {})
        dims = {name: c.embedding_dim for c in configs for name in c.feature_names}
        self.user_dim = sum(dims[f] for f in self.user_feature_names)
        self.item_dim = sum(dims[f] for f in self.item_feature_names)
        width = self.user_dim + self.item_dim
        self.sparse_arch = EmbeddingBagCollection(tables=configs, device=device)
        self.cross = LowRankCrossNet(width, config.cross_layers, config.low_rank)
        self.head = mlp(width, config.mlp, len(self.labels))
        weights = torch.ones(len(self.labels)) if label_weights is None else label_weights
        if weights.shape != (len(self.labels),):
            raise ValueError(
                f"label_weights must be [T={len(self.labels)}] for labels {self.labels}, "
                f"got {tuple(weights.shape)}"
            )
        self.label_weights: torch.Tensor
        self.register_buffer("label_weights", weights.float(), persistent=False)
        self.frozen = False

    def freeze(self) -> Ranker:
        """Eval mode, and every forward without autograd from now on: a teacher or reward
        model never trains, and a sharded table (whose fused optimizer would update inside
        backward) must never see a gradient. Returns self."""
        self.eval()
        for parameter in self.parameters():
            if parameter.is_leaf:  # sharded tables expose views of their fused weights
                parameter.requires_grad_(False)
        self.frozen = True
        return self

    def _autograd(self) -> torch.autograd.grad_mode.set_grad_enabled:
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)

    def forward(
        self,
        user_features: KeyedJaggedTensor,
        item_features: KeyedJaggedTensor,
        extra_item_features: KeyedJaggedTensor | None = None,
        extra_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the B logged pairs, then of E extra pairs, in one table lookup.

        Args:
            user_features: KJT, every user key, stride B.
            item_features: KJT, every item key, stride B (row b is paired with user row b).
            extra_item_features: KJT, item keys, stride E (e.g. sampled negatives), or None.
            extra_rows: [E] int64, the user row (in [0, B)) each extra item is paired with.

        Returns:
            [B + E, T] logits (E = 0 without extra items).
        """
        user_features = self._own(user_features, self.user_feature_names)
        item_features = self._own(item_features, self.item_feature_names)
        if extra_item_features is not None:
            extra_item_features = self._own(extra_item_features, self.item_feature_names)
        features = KeyedJaggedTensor.concat([user_features, item_features])
        rows = features.stride()
        if extra_item_features is not None:
            if extra_rows is None or extra_rows.shape != (extra_item_features.stride(),):
                raise ValueError("extra_rows must be [E]: the user row of each extra item")
            features = stack_rows(features, extra_item_features)
        with self._autograd():
            pooled = self.sparse_arch(features).to_dict()
            user = self._concat(pooled, self.user_feature_names)[:rows]
            item = self._concat(pooled, self.item_feature_names)
            if extra_rows is not None:
                user = torch.cat([user, user[extra_rows]])
            return self.interact(user, item)

    def score(
        self, user_features: KeyedJaggedTensor, item_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        """Logits [B, T] of the pairs (user row b, item row b); both KJTs have stride B."""
        return self.forward(user_features, item_features)

    def net_user_value(
        self, user_features: KeyedJaggedTensor, item_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        """[B] expected NUV, sigmoid(score) . label_weights, of the pairs (user b, item b)."""
        return expected_net_user_value(self.score(user_features, item_features), self.label_weights)

    @staticmethod
    def _own(features: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
        """The ranker's keys of ``features``, without weights: the ranker embeds every feature
        (counter buckets and text tokens included) as plain ids."""
        return without_weights(select_keys(features, keys))

    def user_inputs(self, user_features: KeyedJaggedTensor) -> torch.Tensor:
        """[U, D_user] pooled user embeddings (the user half of x0); KJT stride U."""
        user_features = self._own(user_features, self.user_feature_names)
        items = empty_features(self.item_feature_names, user_features)
        with self._autograd():
            pooled = self.sparse_arch(KeyedJaggedTensor.concat([user_features, items])).to_dict()
            return self._concat(pooled, self.user_feature_names)

    def item_inputs(self, item_features: KeyedJaggedTensor) -> torch.Tensor:
        """[N, D_item] pooled item embeddings (the item half of x0); KJT stride N."""
        item_features = self._own(item_features, self.item_feature_names)
        users = empty_features(self.user_feature_names, item_features)
        with self._autograd():
            pooled = self.sparse_arch(KeyedJaggedTensor.concat([users, item_features])).to_dict()
            return self._concat(pooled, self.item_feature_names)

    def interact(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Cross layers and MLP over pairs: user [P, D_user], item [P, D_item] -> [P, T]."""
        with self._autograd():
            return self.head(self.cross(torch.cat([user, item], dim=1)))

    def score_items(
        self,
        user_features: KeyedJaggedTensor,
        item_features: KeyedJaggedTensor,
        pair_chunk: int = PAIR_CHUNK,
    ) -> torch.Tensor:
        """Every user against every item: one lookup per side, interactions in chunks.

        Args:
            user_features: KJT, user keys, stride U.
            item_features: KJT, item keys, stride N (e.g. ``ItemFeatureStore.lookup(ids)``).
            pair_chunk: pairs per interaction chunk (memory bound).

        Returns:
            [U, N, T] logits; entry (u, n) equals ``score`` of the pair (user u, item n).
        """
        user = self.user_inputs(user_features)
        item = self.item_inputs(item_features)
        users, items = user.shape[0], item.shape[0]
        per_chunk = max(1, pair_chunk // max(items, 1))
        blocks = []
        for start in range(0, users, per_chunk):
            block = user[start : start + per_chunk]
            count = block.shape[0]
            pairs_user = block.unsqueeze(1).expand(count, items, -1).reshape(count * items, -1)
            pairs_item = item.unsqueeze(0).expand(count, items, -1).reshape(count * items, -1)
            blocks.append(self.interact(pairs_user, pairs_item).view(count, items, -1))
        if not blocks:
            return user.new_zeros(0, items, len(self.labels))
        return torch.cat(blocks)

    @staticmethod
    def _concat(pooled: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        return torch.cat([pooled[name] for name in names], dim=1)
