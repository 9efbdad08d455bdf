"""The two-tower forward pass: extra items share the batch's lookup; the temperature."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec import KeyedJaggedTensor

from config import load_config
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from models.temperature import Temperature
from models.two_tower import stack_rows
from tests.tiny_dataset import write_tiny_dataset
from trainer.build import build_unsharded_model


def test_stack_rows_appends_rows_and_empty_bags() -> None:
    batch = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4, 5]),
        lengths=torch.tensor([1, 2, 1, 1]),
    )  # a: [1], [2, 3]; b: [4], [5]
    extra = KeyedJaggedTensor.from_lengths_sync(
        keys=["b"], values=torch.tensor([7, 8, 9]), lengths=torch.tensor([2, 0, 1])
    )
    stacked = stack_rows(batch, extra).to_dict()
    assert stacked["a"].lengths().tolist() == [1, 2, 0, 0, 0]
    assert stacked["a"].values().tolist() == [1, 2, 3]
    assert stacked["b"].lengths().tolist() == [1, 1, 2, 0, 1]
    assert stacked["b"].values().tolist() == [4, 5, 7, 8, 9]


def test_extra_items_embed_like_batch_items(tmp_path: Path) -> None:
    """An item embedded as an extra row gets exactly its embedding as a batch item."""
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    config = load_config(None, [f"data.path={root}", "model.output_dim=8"])
    torch.manual_seed(0)
    model = build_unsharded_model(manifest, config)
    store = ItemFeatureStore.load(root, manifest)
    from data_pipeline.split_table import read_split_columns
    from trainer.build import batch_builder

    table = read_split_columns(
        str(root), manifest, "train", manifest.schema.event_arrow_schema().names
    )
    batch = batch_builder(manifest, config)(table.slice(0, 6))
    extra_ids = torch.tensor([5, 17, 5, 42])
    outputs = model(batch.user_features, batch.item_features, store.lookup(extra_ids))
    alone = model(batch.user_features, batch.item_features)
    assert outputs.extra_items.shape == (4, 8)
    torch.testing.assert_close(outputs.user, alone.user)
    torch.testing.assert_close(outputs.item, alone.item)
    as_batch = model(batch.user_features, store.lookup(batch.item_ids)).item
    torch.testing.assert_close(as_batch, alone.item)
    same = model(batch.user_features, batch.item_features, store.lookup(batch.item_ids))
    torch.testing.assert_close(same.extra_items, alone.item)
    torch.testing.assert_close(outputs.extra_items[0], outputs.extra_items[2])


def test_learned_temperature_moves_and_is_clamped() -> None:
    learned = Temperature(0.1, learn=True, low=0.05, high=0.5)
    (1.0 / learned()).backward()
    assert learned.log_temperature.grad is not None and learned.log_temperature.grad != 0
    with torch.no_grad():
        learned.log_temperature.fill_(10.0)
    assert float(learned()) == pytest.approx(0.5)
    fixed = Temperature(0.1, learn=False, low=0.05, high=0.5)
    assert not list(fixed.parameters()) and float(fixed()) == pytest.approx(0.1)
