"""The two-tower retrieval model: one sharded embedding collection, a user tower and an item tower.

Optional parts (history encoder, heads) join by configuration in later issues, not by subclassing.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from data_pipeline.schema import EventSchema
from models.towers import Tower, table_configs
from trainer.config import ModelConfig


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
        self.temperature = config.temperature

    def forward(
        self, user_features: KeyedJaggedTensor, item_features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both KJTs have stride B. Returns (user embeddings [B, D], item embeddings [B, D])."""
        pooled = self.sparse_arch(KeyedJaggedTensor.concat([user_features, item_features]))
        embeddings = pooled.to_dict()
        return self.user_tower(embeddings), self.item_tower(embeddings)
