"""Towers: pooled feature embeddings -> feature interaction (concatenation) -> MLP -> embedding.

The embedding tables themselves live in one TorchRec ``EmbeddingBagCollection`` owned by the
two-tower model (so a table such as ``item_id`` is declared once and shared by the item tower and
the user history); a tower only reads the pooled outputs of its features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, PoolingType

from config import Pooling
from data_pipeline.schema import FeatureSpec
from models.feature_layout import FeatureLayout

_POOLING = {Pooling.SUM: PoolingType.SUM, Pooling.MEAN: PoolingType.MEAN}


def table_configs(
    features: Sequence[FeatureSpec],
    tables: dict[str, int],
    default_dim: int,
    table_dims: dict[str, int],
    pooling: Mapping[str, PoolingType] | None = None,
    check_dims: bool = True,
) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per table named by ``features``, listing every feature that
    reads it (shared tables such as ``item_id`` + ``hist_item_ids`` appear once).

    Args:
        pooling: table -> pooling (default mean).
        check_dims: ``table_dims`` may only name tables of ``features``.
    """
    unknown = sorted(set(table_dims) - {f.table for f in features})
    if unknown and check_dims:
        raise ValueError(f"model.table_dims names tables {unknown} that no feature uses")
    pooling = pooling or {}
    by_table: dict[str, list[str]] = {}
    for feature in features:
        by_table.setdefault(feature.table, []).append(feature.name)
    configs = []
    for table, feature_names in by_table.items():
        if table not in tables:
            raise ValueError(
                f"feature(s) {feature_names} read table '{table}' missing from manifest"
            )
        configs.append(
            EmbeddingBagConfig(
                name=table,
                embedding_dim=table_dims.get(table, default_dim),
                num_embeddings=tables[table],
                feature_names=feature_names,
                pooling=pooling.get(table, PoolingType.MEAN),
            )
        )
    return configs


def bag_table_configs(
    features: Sequence[FeatureSpec],
    tables: dict[str, int],
    default_dim: int,
    table_dims: dict[str, int],
    layout: FeatureLayout,
) -> tuple[list[EmbeddingBagConfig], list[EmbeddingBagConfig]]:
    """Tables of pooled ``features`` split into plain ones and weighted ones (a table read with
    per-id weights; it sums, and mean-pooled features arrive with row-normalized weights).

    Dimensions: the layout's, else ``table_dims``, else ``default_dim``; pooling: the layout's.
    """
    dims = {**table_dims, **{t: x.dim for t, x in layout.tables.items() if x.dim is not None}}
    weighted = [f for f in features if layout.table(f.table).weighted]
    plain = [f for f in features if not layout.table(f.table).weighted]
    pooling = {t: _POOLING[x.pooling] for t, x in layout.tables.items()}
    return (
        table_configs(plain, tables, default_dim, dims, pooling, check_dims=False),
        table_configs(
            weighted,
            tables,
            default_dim,
            dims,
            {f.table: PoolingType.SUM for f in weighted},
            check_dims=False,
        ),
    )


def mlp(input_dim: int, hidden: Sequence[int], output_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = input_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """Concatenate the pooled embeddings of ``feature_names`` and run an MLP.

    Args:
        feature_names: KJT keys this tower reads, in concatenation order.
        input_dim: sum of their embedding dimensions.
        hidden: MLP hidden widths.
        output_dim: D, the retrieval embedding size.
        l2_normalize: unit-norm outputs (scores become cosines).
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        input_dim: int,
        hidden: Sequence[int],
        output_dim: int,
        l2_normalize: bool = True,
    ) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.mlp = mlp(input_dim, hidden, output_dim)
        self.l2_normalize = l2_normalize

    @property
    def hidden_dim(self) -> int:
        """Width of the last hidden layer (the input width without hidden layers)."""
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        return last.in_features

    def forward(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """pooled: feature -> [B, d_f]. Returns [B, D]."""
        return self.forward_with_hidden(pooled)[1]

    def forward_with_hidden(
        self, pooled: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled: feature -> [B, d_f]. Returns (last hidden layer [B, H], output [B, D])."""
        hidden = torch.cat([pooled[name] for name in self.feature_names], dim=1)
        *hidden_layers, output_layer = self.mlp.children()
        for layer in hidden_layers:
            hidden = layer(hidden)
        out = output_layer(hidden)
        return hidden, nn.functional.normalize(out, dim=1) if self.l2_normalize else out
