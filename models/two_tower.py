"""The two-tower retrieval model: one sharded embedding collection, a user tower and an item tower.

Optional parts (history encoder, heads) join by configuration in later issues, not by subclassing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from data_pipeline.schema import EventSchema
from models.temperature import Temperature
from models.towers import Tower, table_configs
from trainer.config import ModelConfig


class TowerOutputs(NamedTuple):
    """What one forward pass returns.

    Args:
        user: [B, D] user (query) embeddings.
        item: [B, D] embeddings of the batch's items.
        extra_items: [E, D] embeddings of extra items (sampled / hard negatives); [0, D] if none.
        temperature: [] the softmax temperature (learned or fixed).
    """

    user: torch.Tensor
    item: torch.Tensor
    extra_items: torch.Tensor
    temperature: torch.Tensor


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
        configs = table_configs(schema.features, tables, config.embedding_dim, config.table_dims)
        dims = {name: c.embedding_dim for c in configs for name in c.feature_names}
        self.sparse_arch = EmbeddingBagCollection(tables=configs, device=device)
        user_features = [f.name for f in schema.user_features()]
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

    def forward(
        self,
        user_features: KeyedJaggedTensor,
        item_features: KeyedJaggedTensor,
        extra_item_features: KeyedJaggedTensor | None = None,
    ) -> TowerOutputs:
        """``user_features`` and ``item_features`` have stride B; ``extra_item_features`` (item
        keys, stride E) are items outside the batch, embedded in the same table lookup."""
        features = KeyedJaggedTensor.concat([user_features, item_features])
        rows = features.stride()
        if extra_item_features is not None:
            features = stack_rows(features, extra_item_features)
        pooled = self.sparse_arch(features).to_dict()
        user = self.user_tower({k: v[:rows] for k, v in pooled.items()})
        items = self.item_tower(pooled)
        return TowerOutputs(user, items[:rows], items[rows:], self.temperature())
