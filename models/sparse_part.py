"""The sparse part of the two-tower model: its embedding collections and the routing of feature
keys to them, built by the builder and handed to the model, as TorchRec's own ``TwoTower``
receives its ``embedding_bag_collection``.

Three collections, each optional but the first:

- ``bags``: unweighted pooled tables (ids, categories, counter buckets, a mean-pooled history
  bag). An ``EmbeddingBagCollection``, or any module mapping a KJT of ``pooled_features`` to a
  ``KeyedTensor`` of pooled ``[stride, d_f]`` embeddings (the plain-PyTorch baseline's bags);
- ``weighted``: tables read with per-id weights (text idf, affinities);
- ``sequences``: the history encoder's unpooled sequences (an ``EmbeddingCollection``: the
  shared ``item_id`` table, the history items and the per-event action and recency tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from config import ModelConfig
from data_pipeline.derived import history_feature_tables
from data_pipeline.schema import ITEM_ID, EventSchema
from models.feature_layout import FeatureLayout
from models.sequence_arch import sequence_feature_names, sequence_table_configs
from models.towers import bag_table_configs


@dataclass
class SparsePart:
    """Args:
    bags: the unweighted pooled collection (see the module docstring).
    pooled_features: keys ``bags`` reads, in its order.
    dims: feature -> embedding dimension of every pooled and weighted feature, and of
        ``item_id`` when the sequences hold it.
    weighted: the weighted pooled collection, or None.
    weighted_features: keys ``weighted`` reads.
    sequences: the history encoder's collection, or None.
    sequence_features: keys ``sequences`` reads.
    history_tables: per-event table -> rows of the history encoder (empty without it).
    """

    bags: nn.Module
    pooled_features: list[str]
    dims: dict[str, int]
    weighted: EmbeddingBagCollection | None = None
    weighted_features: list[str] = field(default_factory=list)
    sequences: EmbeddingCollection | None = None
    sequence_features: list[str] = field(default_factory=list)
    history_tables: dict[str, int] = field(default_factory=dict)


def build_sparse_part(
    schema: EventSchema,
    tables: dict[str, int],
    config: ModelConfig,
    layout: FeatureLayout | None = None,
    device: torch.device | None = None,
) -> SparsePart:
    """TorchRec collections for ``schema``'s features (``meta`` ``device`` before sharding).

    Raises:
        ValueError: ``model.table_dims`` names a table no feature uses.
    """
    layout = layout or FeatureLayout.from_schema(schema)
    dims: dict[str, int] = {}
    sequences, sequence_features, history_tables = None, [], {}
    if config.history.enabled:
        history_tables = history_feature_tables(schema, config.history.recency_buckets)
        item_dim = config.table_dims.get(ITEM_ID, config.embedding_dim)
        sequence_features = sequence_feature_names(history_tables)
        sequences = EmbeddingCollection(
            tables=sequence_table_configs(tables, history_tables, item_dim), device=device
        )
        dims[ITEM_ID] = item_dim
    pooled = [
        f
        for f in schema.features
        if f.name not in sequence_features and f.name not in layout.not_embedded
    ]
    configs, weighted_configs = bag_table_configs(
        pooled, tables, config.embedding_dim, config.table_dims, layout
    )
    unknown = sorted(set(config.table_dims) - {f.table for f in schema.features})
    if unknown:
        raise ValueError(f"model.table_dims names tables {unknown} that no feature uses")
    dims.update(
        {name: c.embedding_dim for c in configs + weighted_configs for name in c.feature_names}
    )
    weighted = None
    if weighted_configs:
        weighted = EmbeddingBagCollection(tables=weighted_configs, is_weighted=True, device=device)
    return SparsePart(
        bags=EmbeddingBagCollection(tables=configs, device=device),
        pooled_features=[name for c in configs for name in c.feature_names],
        dims=dims,
        weighted=weighted,
        weighted_features=[name for c in weighted_configs for name in c.feature_names],
        sequences=sequences,
        sequence_features=sequence_features,
        history_tables=history_tables,
    )
