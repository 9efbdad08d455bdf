"""The ranker model: shapes, any-pair scoring, corpus scoring, loss and NUV, sampled negatives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from config import ExperimentConfig, load_config
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from models.ranker import Ranker, expected_net_user_value, ranker_bce_loss
from tests.tiny_dataset import ITEMS, write_tiny_dataset
from trainer.negatives.negative_sampling import step_generator
from trainer.ranker_build import (
    build_unsharded_ranker,
    ranker_first_row_batch,
    ranker_schema,
    with_sampled_negatives,
)

SMALL = ["ranker.embedding_dim=8", "ranker.mlp=[16]", "ranker.low_rank=2", "ranker.cross_layers=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, ExperimentConfig]:
    root = write_tiny_dataset(tmp_path_factory.mktemp("ranker") / "data")
    config = load_config(
        None, [f"data.path={root}", "loss.label_weights={click: 1.0, like: 0.5}", *SMALL]
    )
    return root, Manifest.load(root), config


def _batch(root: Path, manifest: Manifest, config: ExperimentConfig, rows: int = 12):
    from data_pipeline.batch import BatchBuilder

    units = list_work_units(manifest.split_paths(root, "train"))
    table = read_unit(units[0], None).slice(0, rows)
    return BatchBuilder(ranker_schema(manifest, config))(table)


def test_shapes_and_extra_pairs(tiny) -> None:
    root, manifest, config = tiny
    torch.manual_seed(0)
    ranker = build_unsharded_ranker(manifest, config)
    batch = _batch(root, manifest, config)
    logits = ranker(batch.user_features, batch.item_features)
    assert logits.shape == (12, 2)
    store = ItemFeatureStore.load(root, manifest)
    extra_rows = torch.tensor([0, 0, 5])
    joint = ranker(
        batch.user_features, batch.item_features, store.lookup(torch.tensor([1, 2, 3])), extra_rows
    )
    assert joint.shape == (15, 2)
    torch.testing.assert_close(joint[:12], logits)
    # Extra pair j is (user row extra_rows[j], item j), the same as scoring that pair alone.
    alone = ranker.score_items(batch.user_features, store.lookup(torch.tensor([1, 2, 3])))
    torch.testing.assert_close(joint[12:14], alone[0, :2])
    torch.testing.assert_close(joint[14], alone[5, 2])
    assert logits.requires_grad
    frozen = ranker.freeze()
    assert not frozen.training
    assert not frozen(batch.user_features, batch.item_features).requires_grad


def test_score_items_equals_pairwise_scores(tiny) -> None:
    """Any (user, item) pair, not only logged ones: a user block x the whole corpus."""
    root, manifest, config = tiny
    torch.manual_seed(0)
    ranker = build_unsharded_ranker(manifest, config).eval()
    batch = _batch(root, manifest, config, rows=4)
    store = ItemFeatureStore.load(root, manifest)
    corpus = store.corpus_ids()
    with torch.no_grad():
        grid = ranker.score_items(batch.user_features, store.lookup(corpus), pair_chunk=50)
    assert grid.shape == (4, ITEMS, 2)
    rows = torch.arange(4).repeat_interleave(ITEMS)
    users = _select_rows(batch.user_features, rows)
    with torch.no_grad():
        pairwise = ranker.score(users, store.lookup(corpus.repeat(4)))
    torch.testing.assert_close(grid.reshape(-1, 2), pairwise, atol=1e-5, rtol=1e-5)
    values = ranker.net_user_value(users, store.lookup(corpus.repeat(4)))
    expected = torch.sigmoid(pairwise) @ torch.tensor([1.0, 0.5])
    torch.testing.assert_close(values.detach(), expected, atol=1e-5, rtol=1e-5)


def _select_rows(features, rows: torch.Tensor):
    """Reference row gather of a KJT (slow, per key and row)."""
    from torchrec import KeyedJaggedTensor

    values, lengths = [], []
    for jagged in features.to_dict().values():
        parts = jagged.to_dense()
        for row in rows.tolist():
            values.append(parts[row])
            lengths.append(len(parts[row]))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=features.keys(), values=torch.cat(values), lengths=torch.tensor(lengths)
    )


def test_bce_loss_matches_reference_and_ignores_zero_weight_rows() -> None:
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [9.0, 9.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    weights = torch.tensor([1.0, 3.0, 0.0])
    per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    expected = (per_row[0] + 3 * per_row[1]) / 4
    torch.testing.assert_close(ranker_bce_loss(logits, labels, weights), expected)
    assert float(ranker_bce_loss(logits, labels, torch.zeros(3))) == 0.0


def test_expected_net_user_value() -> None:
    logits = torch.zeros(2, 3, 2)
    values = expected_net_user_value(logits, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(values, torch.full((2, 3), 1.5))


def test_label_weights_shape_is_checked(tiny) -> None:
    _, manifest, config = tiny
    with pytest.raises(ValueError, match=r"label_weights must be \[T=2\]"):
        Ranker(ranker_schema(manifest, config), manifest.tables, config.ranker, torch.ones(3))


def test_sampled_negatives_pair_each_row_with_random_items(tiny) -> None:
    root, manifest, config = tiny
    batch = _batch(root, manifest, config, rows=6)
    store = ItemFeatureStore.load(root, manifest)
    examples = with_sampled_negatives(batch, store, 3, step_generator(0, 0, 0, torch.device("cpu")))
    assert examples.extra_item_features is not None and examples.extra_rows is not None
    assert examples.extra_item_features.stride() == 18
    assert examples.extra_rows.tolist() == [r for r in range(6) for _ in range(3)]
    assert examples.labels.shape == (24, 2)
    assert examples.labels[6:].eq(0).all() and examples.labels[:6].equal(batch.labels)
    hits = examples.item_ids[6:] == batch.item_ids[examples.extra_rows]
    assert examples.weights[6:].eq((~hits).float()).all()
    same = with_sampled_negatives(batch, store, 3, step_generator(0, 0, 0, torch.device("cpu")))
    assert same.item_ids.equal(examples.item_ids)  # seeded: a resumed run draws the same
    plain = with_sampled_negatives(batch, None, 0, step_generator(0, 0, 0, torch.device("cpu")))
    assert plain.extra_item_features is None and plain.labels.shape == (6, 2)


def test_first_row_batch_has_ranker_keys(tiny) -> None:
    root, manifest, config = tiny
    batch = ranker_first_row_batch(manifest, config, "test")
    ranker = build_unsharded_ranker(manifest, config)
    assert batch.user_features.keys() == ranker.user_feature_names
    assert batch.item_features.keys() == ranker.item_feature_names
