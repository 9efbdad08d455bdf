"""The two-tower retrieval model: one sharded embedding collection, a user tower and an item tower.

Optional parts (history encoder, heads) join by configuration in later issues, not by subclassing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedJaggedTensor

from data_pipeline.derived import history_feature_tables
from data_pipeline.schema import ITEM_ID, EventSchema
from models.debias import DebiasEstimates, build_example_debias
from models.light_ranker import LightRankingHead
from models.sequence_arch import HistoryArch, sequence_feature_names, sequence_table_configs
from models.temperature import Temperature
from models.towers import Tower, table_configs
from trainer.config import ModelConfig

# Key of the history encoder's output among the user tower's inputs.
HISTORY_OUTPUT = "history_encoder"


class TowerOutputs(NamedTuple):
    """What one forward pass returns.

    Args:
        user: [B, D] user (query) embeddings.
        item: [B, D] embeddings of the batch's items.
        extra_items: [E, D] embeddings of extra items (sampled / hard negatives); [0, D] if none.
        temperature: [] the softmax temperature (learned or fixed).
        ranker_user: [B, NU, D] the light ranking head's user embeddings; None without it.
        debias: [B] estimates of the debias heads (``models/debias.py``); None where a head is
            off or, for position, where no position was given.
    """

    user: torch.Tensor
    item: torch.Tensor
    extra_items: torch.Tensor
    temperature: torch.Tensor
    ranker_user: torch.Tensor | None = None
    debias: DebiasEstimates = DebiasEstimates()


def select_keys(features: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    """The KJT restricted to ``keys`` (in that order), same stride."""
    index = {key: i for i, key in enumerate(features.keys())}
    return features.permute([index[key] for key in keys])


def stack_rows(batch: KeyedJaggedTensor, extra: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Rows of ``extra`` (stride E, any subset of keys) appended under ``batch`` (stride B):
    stride B + E, keys of ``batch``; keys missing from ``extra`` get empty bags there."""
    extra_rows = extra.to_dict()
    count = extra.stride()
    values, lengths = [], []
    for key, jagged in batch.to_dict().items():
        values.append(jagged.values())
        lengths.append(jagged.lengths())
        if key in extra_rows:
            values.append(extra_rows[key].values())
            lengths.append(extra_rows[key].lengths())
        else:
            lengths.append(torch.zeros(count, dtype=jagged.lengths().dtype, device=jagged.device()))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=batch.keys(), values=torch.cat(values), lengths=torch.cat(lengths)
    )


class TwoTowerModel(nn.Module):
    """Args:
    schema: event schema (features per side).
    tables: table name -> rows, from the manifest.
    config: model configuration.
    device: where the embedding tables are created (``meta`` before sharding).
    """

    def __init__(
        self,
        schema: EventSchema,
        tables: dict[str, int],
        config: ModelConfig,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.sequence_features: list[str] = []
        self.sequence_arch: EmbeddingCollection | None = None
        self.history: HistoryArch | None = None
        dims: dict[str, int] = {}
        user_features = [f.name for f in schema.user_features()]
        if config.history.enabled:
            history_tables = history_feature_tables(schema, config.history.recency_buckets)
            item_dim = config.table_dims.get(ITEM_ID, config.embedding_dim)
            self.sequence_features = sequence_feature_names(history_tables)
            self.sequence_arch = EmbeddingCollection(
                tables=sequence_table_configs(tables, history_tables, item_dim), device=device
            )
            self.history = HistoryArch(history_tables, config.history, item_dim)
            dims[ITEM_ID] = item_dim
            dims[HISTORY_OUTPUT] = self.history.output_dim
            user_features = [f for f in user_features if f not in self.sequence_features]
            user_features.append(HISTORY_OUTPUT)
        pooled = [f for f in schema.features if f.name not in self.sequence_features]
        self.pooled_features = [f.name for f in pooled]
        configs = table_configs(pooled, tables, config.embedding_dim, config.table_dims)
        dims.update({name: c.embedding_dim for c in configs for name in c.feature_names})
        self.sparse_arch = EmbeddingBagCollection(tables=configs, device=device)
        item_features = [f.name for f in schema.item_features()]
        self.user_tower = Tower(
            user_features,
            sum(dims[f] for f in user_features),
            config.user_mlp,
            config.output_dim,
            config.l2_normalize,
        )
        self.item_tower = Tower(
            item_features,
            sum(dims[f] for f in item_features),
            config.item_mlp,
            config.output_dim,
            config.l2_normalize,
        )
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
    ) -> TowerOutputs:
        """``user_features`` and ``item_features`` have stride B; ``extra_item_features`` (item
        keys, stride E) are items outside the batch, embedded in the same table lookup;
        ``position`` [B] int64 (-1: unknown) feeds the position debias head. The heads run
        inside forward so DDP sees their parameters used."""
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

    def user_embeddings(self, user_features: KeyedJaggedTensor) -> torch.Tensor:
        """The user tower alone (serving): [B, D], equal to ``forward(...).user`` of any batch
        with these user features. ``user_features``: KJT with every user key, stride B."""
        rows = user_features.stride()
        lengths = user_features.lengths()
        no_items = KeyedJaggedTensor(
            keys=self.item_tower.feature_names,
            values=user_features.values().new_zeros(0),
            lengths=lengths.new_zeros(len(self.item_tower.feature_names) * rows),
        )
        features = KeyedJaggedTensor.concat([user_features, no_items])
        return self.user_tower(self._lookup(features, rows))

    def _lookup(self, features: KeyedJaggedTensor, rows: int) -> dict[str, torch.Tensor]:
        """Feature -> pooled embeddings [stride, d_f]; with the history encoder also
        ``item_id`` [stride, d] (one id per row) and the history encoding [rows, d_h] of the
        first ``rows`` rows (the ones with user features)."""
        if self.sequence_arch is None or self.history is None:
            return self.sparse_arch(features).to_dict()
        embeddings = self.sparse_arch(select_keys(features, self.pooled_features)).to_dict()
        sequences = self.sequence_arch(select_keys(features, self.sequence_features))
        embeddings[ITEM_ID] = sequences[ITEM_ID].values()  # one id per row: [B + E, D]
        embeddings[HISTORY_OUTPUT] = self.history(sequences, rows)
        return embeddings
