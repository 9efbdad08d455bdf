"""The two-tower model over every MovieLens feature group: the weighted text table, tower widths
with dense counter inputs, dense counters wired per row, idf-weighted mean pooling checked
against the table rows by hand, and the user tower alone (with and without KJT weights)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import KeyedJaggedTensor

from config import load_config
from data_pipeline.batch import Batch
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from models.kjt_ops import without_weights
from models.two_tower import TwoTowerModel
from tests.tiny_dataset import TINY_MODEL
from tests.tiny_movielens import write_tiny_movielens
from trainer.build import batch_builder, build_unsharded_model, item_store

TEXT = "item_title_tokens"
COUNTERS = [f"item_{k}_count_{w}" for k in ("rating", "like") for w in ("1d", "7d", "30d")]
ITEMS = 6


class Setup:
    """The model (eval mode, seed 0), the batch builder, the 36 train rows as one batch, the item
    store and the ``items/`` table of the tiny MovieLens copy."""

    def __init__(self, root: Path) -> None:
        manifest = Manifest.load(root)
        config = load_config(
            None,
            [
                f"data.path={root}",
                *TINY_MODEL,
                "model.table_dims={gender: 4, text_tokens: 8}",
            ],
        )
        torch.manual_seed(0)
        self.model: TwoTowerModel = build_unsharded_model(manifest, config).eval()
        self.manifest = manifest
        self.builder = batch_builder(manifest, config)
        self.train: pa.Table = pq.read_table(root / "train")
        self.batch: Batch = self.builder(self.train)
        self.store: ItemFeatureStore = item_store(manifest, config)
        self.items: pa.Table = pq.read_table(root / "items")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(write_tiny_movielens(tmp_path_factory.mktemp("ml")))


def _users(setup: Setup, rows: int) -> KeyedJaggedTensor:
    """The user features of the first ``rows`` train rows."""
    return setup.builder(setup.train.slice(0, rows)).user_features


def _tower_inputs(model: TwoTowerModel, *args: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    """The item tower's input dict of one forward pass."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, inputs: tuple[dict[str, torch.Tensor]]) -> None:
        captured.update(inputs[0])

    handle = model.item_tower.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*args)
    finally:
        handle.remove()
    return captured


def test_weighted_arch_holds_the_text_table(setup: Setup) -> None:
    model = setup.model
    assert model.weighted_arch is not None
    assert list(model.weighted_arch.embedding_bags) == ["text_tokens"]
    assert model.weighted_arch.is_weighted()
    assert model.weighted_arch.embedding_bags["text_tokens"].weight.shape == (1024, 8)
    assert model.weighted_features == [TEXT]
    assert (
        TEXT not in model.pooled_features and "text_tokens" not in model.sparse_arch.embedding_bags
    )


def test_tower_widths_add_one_input_per_dense_counter(setup: Setup) -> None:
    model = setup.model
    # user: user_id, age_bucket, occupation, zip_prefix, hist_item_ids, ctx_hour, ctx_weekday at
    # 16, gender at 4.
    assert model.user_tower.mlp[0].in_features == 7 * 16 + 4
    # item: item_id, genres, year_bucket at 16, title tokens at 8, 6 counters at 16 + 1 each.
    assert model.item_tower.mlp[0].in_features == 3 * 16 + 8 + 6 * (16 + 1)
    assert [k for k in model.item_tower.feature_names if k.endswith("_value")] == [
        f"{c}_value" for c in COUNTERS
    ]


def test_forward_on_a_real_batch(setup: Setup) -> None:
    batch = setup.batch
    with torch.no_grad():
        out = setup.model(batch.user_features, batch.item_features)
    assert out.user.shape == out.item.shape == (36, 16)
    assert out.extra_items.shape == (0, 16)
    assert torch.isfinite(out.user).all() and torch.isfinite(out.item).all()
    assert torch.allclose(out.user.norm(dim=1), torch.ones(36), atol=1e-5)
    # Items of the same id in the batch differ only through their point-in-time counters.
    assert len({tuple(row.tolist()) for row in out.item}) > ITEMS


def test_extra_items_embed_like_batch_items(setup: Setup) -> None:
    corpus = setup.store.lookup(torch.arange(ITEMS))
    users = _users(setup, ITEMS)
    with torch.no_grad():
        out = setup.model(users, corpus, setup.store.lookup(torch.tensor([3, 0, 5])))
    assert torch.allclose(out.extra_items, out.item[[3, 0, 5]], atol=1e-6)


def test_dense_counter_value_changes_only_its_row(setup: Setup) -> None:
    corpus = setup.store.lookup(torch.arange(ITEMS))
    users = _users(setup, ITEMS)
    row, key = 2, "item_rating_count_7d"
    index = corpus.offset_per_key()[corpus.keys().index(key)] + row  # one value per counter row
    weights = corpus.weights().clone()
    weights[index] += 1.5
    changed = KeyedJaggedTensor(
        keys=corpus.keys(), values=corpus.values(), weights=weights, lengths=corpus.lengths()
    )
    with torch.no_grad():
        before = setup.model(users, corpus).item
        after = setup.model(users, changed).item
    others = [r for r in range(ITEMS) if r != row]
    assert torch.equal(before[others], after[others])
    assert (before[row] - after[row]).abs().max() > 1e-4
    inputs = _tower_inputs(setup.model, users, corpus)
    stats = setup.manifest.counters[key]
    counts = torch.tensor(setup.items[key].to_pylist(), dtype=torch.float64)
    expected = (torch.log1p(counts) - stats["mean"]) / stats["std"]
    assert torch.allclose(inputs[f"{key}_value"].squeeze(1).double(), expected, atol=1e-5)


def test_mean_pooled_text_is_the_idf_weighted_mean_of_table_rows(setup: Setup) -> None:
    model = setup.model
    assert model.weighted_arch is not None
    table = model.weighted_arch.embedding_bags["text_tokens"].weight.detach()
    ids = setup.items["item_id"].to_pylist()
    pooled = _tower_inputs(model, _users(setup, ITEMS), setup.store.lookup(torch.tensor(ids)))[TEXT]
    tokens = setup.items[TEXT].to_pylist()
    idf = setup.items[f"{TEXT}_weights"].to_pylist()
    distinguishes = False
    for row, (ids_of_row, weights) in enumerate(zip(tokens, idf, strict=True)):
        w = torch.tensor(weights).unsqueeze(1)
        rows = table[torch.tensor(ids_of_row)]
        expected = (w * rows).sum(0) / w.sum()
        assert torch.allclose(pooled[row], expected, atol=1e-6), row
        distinguishes |= not torch.allclose(expected, rows.mean(0), atol=1e-4)
    assert distinguishes  # unequal idf within a title: a plain mean would fail the check


def test_user_embeddings_equal_forward_user(setup: Setup) -> None:
    batch = setup.batch
    with torch.no_grad():
        expected = setup.model(batch.user_features, batch.item_features).user
        alone = setup.model.user_embeddings(batch.user_features)
    assert torch.allclose(alone, expected, atol=1e-6)


def test_user_embeddings_without_weights(setup: Setup) -> None:
    """The user side has no weighted feature: a KJT without weights (a caller building only
    user features) gives the same embeddings, though item counters are dense inputs."""
    users = setup.batch.user_features
    assert users.weights_or_none() is not None
    with torch.no_grad():
        expected = setup.model.user_embeddings(users)
        got = setup.model.user_embeddings(without_weights(users))
    assert torch.allclose(got, expected, atol=1e-6)
