"""The two-tower retrieval model: the sparse part it receives (embedding collections and key
routing), a user tower and an item tower. Optional parts (history encoder, light ranking head,
debias heads) join by configuration, not by subclassing.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from config import ModelConfig
from data_pipeline.schema import ITEM_ID, EventSchema
from models.debias import DebiasEstimates, build_example_debias
from models.feature_layout import FeatureLayout
from models.kjt_ops import (
    empty_like_rows,
    row_weight_sums,
    select_keys,
    stack_rows,
    with_weights,
    without_weights,
)
from models.light_ranker import LightRankingHead
from models.sequence_arch import HistoryArch
from models.sparse_part import SparsePart
from models.temperature import Temperature
from models.tower_outputs import TowerOutputs
from models.towers import Tower

__all__ = ["TwoTowerModel", "select_keys", "stack_rows", "dense_key"]

# Key of the history encoder's output among the user tower's inputs.
HISTORY_OUTPUT = "history_encoder"
DENSE_SUFFIX = "_value"


class TwoTowerModel(nn.Module):
    """Args:
    schema: event schema (features per side).
    sparse: the embedding collections and their key routing (``models.sparse_part``), built by
        the caller: TorchRec collections (``build_sparse_part``, sharded by DMP), or the plain
        baseline's bags.
    config: model configuration.
    layout: per-table pooling, weights and dimension, and the dense counters
        (``trainer.features``); default: :meth:`FeatureLayout.from_schema`.

    The collections become ``sparse_arch`` (unweighted bags), ``weighted_arch`` (tables read
    with per-id weights: text idf, affinities; sum pooling of weights that are normalized per row
    for mean-pooled features) and ``sequence_arch`` (the history encoder's sequences). A counter
    feature is embedded by its bucket id and, when dense, its normalized value (the KJT weight)
    joins the tower input as one more column (key ``<name>_value``).
    """

    def __init__(
        self,
        schema: EventSchema,
        sparse: SparsePart,
        config: ModelConfig,
        layout: FeatureLayout | None = None,
    ) -> None:
        super().__init__()
        layout = layout or FeatureLayout.from_schema(schema)
        self.sparse_arch = sparse.bags
        self.weighted_arch = sparse.weighted
        self.sequence_arch = sparse.sequences
        self.pooled_features = sparse.pooled_features
        self.weighted_features = sparse.weighted_features
        self.sequence_features = sparse.sequence_features
        self.history: HistoryArch | None = None
        dims = dict(sparse.dims)
        user_features = [f.name for f in schema.user_features()]
        if config.history.enabled:
            if self.sequence_arch is None:
                raise ValueError("model.history.enabled needs the sparse part's sequences")
            item_dim = dims[ITEM_ID]
            self.history = HistoryArch(sparse.history_tables, config.history, item_dim)
            dims[HISTORY_OUTPUT] = self.history.output_dim
            user_features = [f for f in user_features if f not in self.sequence_features]
            user_features.append(HISTORY_OUTPUT)
        self.dense_features = [f for f in layout.dense if f in {x.name for x in schema.features}]
        dims.update({dense_key(f): 1 for f in self.dense_features})
        # Plain ids only (no weighted table, dense counter or sequence): the batch's KJT is
        # exactly the pooled features, so a lookup needs no key selection.
        self._ids_only = (
            self.weighted_arch is None
            and not self.dense_features
            and self.sequence_arch is None
            and set(self.pooled_features) == {f.name for f in schema.features}
        )
        items = [f.name for f in schema.item_features()]
        self.user_tower = _tower(user_features, layout, self.dense_features, dims, config, True)
        self.item_tower = _tower(items, layout, self.dense_features, dims, config, False)
        low, high = config.temperature_range
        self.temperature = Temperature(config.temperature, config.learn_temperature, low, high)
        self.light_head: LightRankingHead | None = None
        if config.light_head.enabled:
            self.light_head = LightRankingHead(
                self.user_tower.hidden_dim,
                config.output_dim,
                config.light_head.num_embeddings,
                config.light_head.hidden,
                len(schema.labels),
            )
        # Dense submodule: data-parallel under DMP and in the dense optimizer like the towers.
        self.debias = build_example_debias(config.debias, config.output_dim)

    def forward(
        self,
        user_features: KeyedJaggedTensor,
        item_features: KeyedJaggedTensor,
        extra_item_features: KeyedJaggedTensor | None = None,
        position: torch.Tensor | None = None,
        window_targets: torch.Tensor | None = None,
    ) -> TowerOutputs:
        """``user_features`` and ``item_features`` have stride B; ``extra_item_features`` (item
        keys, stride E) are items outside the batch, embedded in the same table lookup;
        ``position`` [B] int64 (-1: unknown) feeds the position debias head. The heads run
        inside forward so DDP sees their parameters used.

        Sequence mode (``window_targets`` [W] int64, non-empty): ``user_features`` has stride W
        (one window of history per row) and ``item_features`` stride B = sum(window_targets),
        the target of every position (see :meth:`_forward_windows`)."""
        if window_targets is not None and window_targets.numel() > 0:
            return self._forward_windows(
                user_features, item_features, window_targets, extra_item_features, position
            )
        features = KeyedJaggedTensor.concat([user_features, item_features])
        rows = features.stride()
        if extra_item_features is not None:
            features = stack_rows(features, extra_item_features)
        embeddings = self._lookup(features, rows)
        user_hidden, user = self.user_tower.forward_with_hidden(
            {k: v[:rows] for k, v in embeddings.items()}
        )
        items = self.item_tower(embeddings)
        ranker_user = None
        if self.light_head is not None:
            ranker_user = self.light_head.project_user(user_hidden)
        debias = DebiasEstimates() if self.debias is None else self.debias(user, position)
        return TowerOutputs(
            user, items[:rows], items[rows:], self.temperature(), ranker_user, debias
        )

    def _forward_windows(
        self,
        user_features: KeyedJaggedTensor,
        item_features: KeyedJaggedTensor,
        window_targets: torch.Tensor,
        extra_item_features: KeyedJaggedTensor | None,
        position: torch.Tensor | None,
    ) -> TowerOutputs:
        """Packed causal training: window w's user vector after each of its newest
        ``window_targets[w]`` history events (one causal pass over the window), each joined
        with the window's own user features, scored against ``item_features`` row by row
        (the event that followed each position, window-major, newest position first).

        Args: user_features stride W; item_features stride B = sum(window_targets);
        window_targets [W]. Returns TowerOutputs with user and item [B, D]."""
        if self.history is None:
            raise ValueError("sequence mode needs model.history.enabled=true")
        windows, targets = user_features.stride(), item_features.stride()
        if int(window_targets.sum()) != targets:
            raise ValueError(
                f"window targets sum to {int(window_targets.sum())}, but item_features has "
                f"{targets} rows"
            )
        items_in = item_features
        if extra_item_features is not None:
            items_in = stack_rows(item_features, extra_item_features)
        # One lookup of the window rows stacked over the item rows (each side's other keys
        # empty): a sharded collection never sees a feature without a single id.
        features = stack_rows(self._with_empty(user_features), items_in)
        looked_up = self._lookup(features, windows, None, window_targets)
        expanded = {
            key: value
            if key == HISTORY_OUTPUT
            else value[:windows].repeat_interleave(window_targets, 0)
            for key, value in looked_up.items()
            if key in self.user_tower.feature_names
        }
        user_hidden, user = self.user_tower.forward_with_hidden(expanded)
        # item_id comes from the unpooled collection, one row per item row already.
        items = self.item_tower(
            {
                key: value if key == ITEM_ID else value[windows:]
                for key, value in looked_up.items()
                if key in self.item_tower.feature_names
            }
        )
        ranker_user = None
        if self.light_head is not None:
            ranker_user = self.light_head.project_user(user_hidden)
        debias = DebiasEstimates() if self.debias is None else self.debias(user, position)
        return TowerOutputs(
            user, items[:targets], items[targets:], self.temperature(), ranker_user, debias
        )

    def _with_empty(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` plus empty bags for every other key the collections read, so one side
        (user rows, or item rows) is looked up alone."""
        present = set(features.keys())
        missing = [
            k
            for k in self.pooled_features + self.weighted_features + self.sequence_features
            if k not in present
        ]
        if not missing:
            return features
        return KeyedJaggedTensor.concat(
            [features, empty_like_rows(list(dict.fromkeys(missing)), features)]
        )

    def _user_dense(self, user_features: KeyedJaggedTensor) -> list[str]:
        """Dense counters among the user features (item counters are not user tower inputs)."""
        user_keys = set(user_features.keys())
        return [k for k in self.dense_features if k in user_keys]

    def user_embeddings(self, user_features: KeyedJaggedTensor) -> torch.Tensor:
        """The user tower alone (serving): [B, D], equal to ``forward(...).user`` of any batch
        with these user features. ``user_features``: KJT with every user key, stride B."""
        rows = user_features.stride()
        # Item counters' dense values are not user tower inputs, and a KJT without weights
        # (no user feature needs any) has none to read.
        looked_up = self._lookup(
            self._with_empty(user_features), rows, self._user_dense(user_features)
        )
        return self.user_tower(looked_up)

    def _lookup(
        self,
        features: KeyedJaggedTensor,
        rows: int,
        dense: list[str] | None = None,
        window_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tower input -> [stride, d]: pooled embeddings per feature, ``<counter>_value``
        [stride, 1] dense counters (of ``dense``, default all); with the history encoder also
        ``item_id`` [stride, d] (one id per row) and the history encoding [rows, d_h] of the
        first ``rows`` rows (the ones with user features; none when ``rows`` is 0), or with
        ``window_targets`` [rows] the encoding at each of their positions
        [sum(window_targets), d_h] (:meth:`HistoryArch.at_positions`)."""
        if self._ids_only and len(features.keys()) == len(self.pooled_features):
            # Every key is a plain pooled feature: no selection or weight stripping per step
            # (a batch that also carries a teacher's features takes the selecting path).
            return self.sparse_arch(features).to_dict()
        embeddings = self.sparse_arch(
            without_weights(select_keys(features, self.pooled_features))
        ).to_dict()
        if self.weighted_arch is not None:
            weighted = with_weights(select_keys(features, self.weighted_features))
            embeddings.update(self.weighted_arch(weighted).to_dict())
        dense = self.dense_features if dense is None else dense
        if dense:
            values = row_weight_sums(features, dense)  # [stride, len(dense)]
            embeddings.update({dense_key(n): values[:, i : i + 1] for i, n in enumerate(dense)})
        if self.sequence_arch is None or self.history is None:
            return embeddings
        sequences = self.sequence_arch(
            without_weights(select_keys(features, self.sequence_features))
        )
        embeddings[ITEM_ID] = sequences[ITEM_ID].values()  # one id per row: [B + E, D]
        if window_targets is not None:
            embeddings[HISTORY_OUTPUT] = self.history.at_positions(sequences, rows, window_targets)
        elif rows > 0:
            embeddings[HISTORY_OUTPUT] = self.history(sequences, rows)
        return embeddings


def dense_key(feature: str) -> str:
    """Tower input key of a counter's dense value."""
    return f"{feature}{DENSE_SUFFIX}"


def _tower(
    features: list[str],
    layout: FeatureLayout,
    dense: list[str],
    dims: dict[str, int],
    config: ModelConfig,
    user: bool,
) -> Tower:
    """The user (``user``) or item tower over ``features``' embeddings and dense values."""
    keys = [key for feature in features for key in _tower_keys(feature, layout, dense)]
    hidden = config.user_mlp if user else config.item_mlp
    return Tower(keys, sum(dims[k] for k in keys), hidden, config.output_dim, config.l2_normalize)


def _tower_keys(feature: str, layout: FeatureLayout, dense: list[str]) -> list[str]:
    """Tower inputs of one feature: its embedding (unless not embedded), its dense value."""
    keys = [] if feature in layout.not_embedded else [feature]
    return keys + ([dense_key(feature)] if feature in dense else [])
