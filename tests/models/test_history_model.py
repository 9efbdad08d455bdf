"""The history encoder inside the two-tower model: one shared item table, empty histories,
and configuration errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from config import ConfigError, load_config
from data_pipeline.manifest import Manifest
from data_pipeline.split_table import read_split_columns
from tests.tiny_dataset import write_tiny_dataset
from trainer.build import batch_builder, build_unsharded_model

HISTORY = [
    "model.history.enabled=true",
    "model.history.recency_buckets=4",
    "model.embedding_dim=8",
    "model.output_dim=8",
]


def _setup(tmp_path: Path, *extra: str):
    root = write_tiny_dataset(tmp_path / "data", history_timestamps=True)
    manifest = Manifest.load(root)
    config = load_config(None, [f"data.path={root}", *HISTORY, *extra])
    torch.manual_seed(0)
    model = build_unsharded_model(manifest, config)
    names = manifest.schema.event_arrow_schema().names
    table = read_split_columns(str(root), manifest, "train", names).slice(0, 12)
    return model, batch_builder(manifest, config), table


def _touched_rows(weight: torch.Tensor) -> set[int]:
    assert weight.grad is not None
    return set(torch.nonzero(weight.grad.abs().sum(dim=1)).flatten().tolist())


@pytest.mark.parametrize("encoder", ["mean", "self_attention"])
def test_history_and_item_tower_share_one_table(tmp_path: Path, encoder: str) -> None:
    model, build, table = _setup(tmp_path, f"model.history.encoder={encoder}")
    pooled_tables = [c.name for c in model.sparse_arch.embedding_bag_configs()]
    assert "item_id" not in pooled_tables  # declared once, in the sequence collection
    (item_table,) = [c for c in model.sequence_arch.embedding_configs() if c.name == "item_id"]
    assert item_table.feature_names == ["item_id", "hist_item_ids"]
    weight = model.sequence_arch.embeddings["item_id"].weight
    batch = build(table)
    history_ids = set(batch.user_features["hist_item_ids"].values().tolist())
    assert history_ids

    model(batch.user_features, batch.item_features).user.sum().backward()
    assert _touched_rows(weight) == history_ids  # the history moves exactly its items' rows
    weight.grad = None
    model(batch.user_features, batch.item_features).item.sum().backward()
    assert _touched_rows(weight) == set(batch.item_ids.tolist())  # the rows the item tower reads


def test_empty_histories_give_finite_outputs_and_gradients(tmp_path: Path) -> None:
    model, build, table = _setup(tmp_path, "model.history.encoder=self_attention")
    empty = pa.array([[] for _ in range(table.num_rows)], pa.list_(pa.int64()))
    for name in ("hist_item_ids", "hist_timestamps"):
        table = table.set_column(table.schema.get_field_index(name), name, empty)
    flags = pa.array([[] for _ in range(table.num_rows)], pa.list_(pa.int8()))
    table = table.set_column(table.schema.get_field_index("hist_like"), "hist_like", flags)
    batch = build(table)
    outputs = model(batch.user_features, batch.item_features)
    assert torch.isfinite(outputs.user).all()
    outputs.user.sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.recent_history=3"], "data.recent_history"),
        (["model.history.num_heads=3"], "model.history.num_heads"),
        (["model.history.recency_buckets=-1"], "model.history.recency_buckets"),
        (["model.history.encoder=lstm"], "model.history.encoder"),
    ],
)
def test_history_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.history.enabled=true", *overrides])
