"""The light ranking head inside retrieval: shapes, on/off, gradient paths, reranking, and
sharded (2 gloo ranks) vs. unsharded agreement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config import ConfigError, load_config
from data_pipeline.manifest import Manifest
from models.light_ranker import (
    LightRankingHead,
    head_bce,
    head_net_user_value,
    light_head_loss,
    rerank,
    target_aware_attention,
    training_candidates,
)
from models.losses import in_batch_softmax_loss, net_user_value
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from tests.trainer.test_sharded_vs_unsharded import _batch, _config, copy_state_dict
from trainer.build import (
    build_dense_optimizer,
    build_sharded_model,
    build_unsharded_model,
)
from trainer.evaluation.evaluate import evaluate_model
from trainer.evaluation.light_rerank import candidate_embeddings
from trainer.runtime.distributed import DistributedEnv, seed_everything

HEAD = ["model.light_head.enabled=true", "model.light_head.num_embeddings=3"]


def test_attention_matches_reference_loop() -> None:
    torch.manual_seed(0)
    ranker_user, items = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    attended, scores = target_aware_attention(ranker_user, items)
    assert attended.shape == (2, 5, 4) and scores.shape == (2, 5, 3)
    for b in range(2):
        for c in range(5):
            expected_scores = ranker_user[b] @ items[b, c]
            weights = expected_scores.softmax(0)
            torch.testing.assert_close(scores[b, c], expected_scores)
            torch.testing.assert_close(attended[b, c], weights @ ranker_user[b])


def test_head_shapes_and_nuv() -> None:
    head = LightRankingHead(
        user_hidden_dim=6, embedding_dim=4, num_embeddings=3, hidden=[8], num_tasks=2
    )
    ranker_user = head.project_user(torch.randn(5, 6))
    assert ranker_user.shape == (5, 3, 4)
    logits = head(ranker_user, torch.randn(5, 7, 4), torch.randn(5, 7))
    assert logits.shape == (5, 7, 2)
    nuv = head_net_user_value(logits, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(
        nuv, torch.sigmoid(logits[..., 0]) + 0.5 * torch.sigmoid(logits[..., 1])
    )


def test_training_candidates_shift_and_mask() -> None:
    items = torch.arange(4.0).unsqueeze(1).expand(4, 2)
    ids = torch.tensor([10, 11, 10, 12])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0])  # row 3 is padding
    candidates, targets, mask = training_candidates(items, ids, labels, weight, 2)
    assert candidates[:, :, 0].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]]
    torch.testing.assert_close(targets[:, 0], labels)
    assert targets[:, 1:].abs().sum() == 0
    # row 0: candidate 2 is an accidental hit (id 10); row 1: row 3 is padding; row 3 padding
    assert mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]]
    logits = torch.zeros(4, 3, 2, requires_grad=True)
    loss = head_bce(logits, targets, mask)
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)))


def test_rerank_orders_subset_by_nuv() -> None:
    torch.manual_seed(0)
    head = LightRankingHead(6, 4, 3, [8], 2)
    ranker_user = torch.randn(3, 3, 4)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3], [4, 8, 6, 0, -1, -1], [1, 2, 3, 4, 5, 6]])
    scores = torch.randn(3, 6)
    items = torch.randn(3, 6, 4)
    weights = torch.tensor([1.0, 2.0])
    nuv, kept = rerank(head, ranker_user, ids, scores, items, weights, num_items=5)
    assert kept.shape == (3, 5)
    for row in range(3):
        valid = [i for i in ids[row].tolist() if i >= 0]
        got = [i for i in kept[row].tolist() if i >= 0]
        assert set(got) <= set(valid) and len(got) == min(5, len(valid))
    assert kept[1, 4] == -1 and nuv[1, 4] == -torch.inf
    finite = torch.where(torch.isfinite(nuv), nuv, torch.full_like(nuv, -1e9))
    assert (finite[:, :-1] >= finite[:, 1:]).all()
    logits = head(ranker_user, items, torch.where(ids >= 0, scores, 0.0))
    expected = head_net_user_value(logits, weights)
    best = expected[0].argmax()
    assert kept[0, 0] == ids[0, best]


def test_candidate_embeddings_lookup() -> None:
    all_ids = torch.tensor([3, 0, 7])
    all_items = torch.tensor([[3.0], [0.5], [7.0]])
    out = candidate_embeddings(torch.tensor([[7, -1], [0, 3]]), all_ids, all_items)
    assert out.squeeze(-1).tolist() == [[7.0, 0.0], [0.5, 3.0]]


def _model_and_batch(tmp_path: Path, *extra: str):
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    config = _config(str(root), *extra)
    torch.manual_seed(0)
    model = build_unsharded_model(manifest, config)
    return model, _batch(root, manifest, slice(0, 16), config), config


def test_head_off_leaves_model_unchanged(tmp_path: Path) -> None:
    off, batch, _ = _model_and_batch(tmp_path)
    on, _, config = _model_and_batch(tmp_path, *HEAD)
    assert off.light_head is None and on.light_head is not None
    head_params = {n for n in on.state_dict() if n.startswith("light_head.")}
    assert set(on.state_dict()) - head_params == set(off.state_dict())
    on.load_state_dict(off.state_dict(), strict=False)
    a, b = (
        off(batch.user_features, batch.item_features),
        on(batch.user_features, batch.item_features),
    )
    assert a.ranker_user is None and b.ranker_user is not None and b.ranker_user.shape == (16, 3, 8)
    for name in ("user", "item", "extra_items", "temperature"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    off_config = load_config(None, [f"data.path={config.data.path}"])
    assert float(light_head_loss(off, a, batch, off_config)) == 0.0


def test_gradients_reach_only_what_they_should(tmp_path: Path) -> None:
    model, batch, config = _model_and_batch(tmp_path, *HEAD)
    outputs = model(batch.user_features, batch.item_features)
    weights = torch.tensor([1.0, 0.5])
    retrieval = in_batch_softmax_loss(
        outputs.user, outputs.item, batch.item_ids, net_user_value(batch.labels, weights), 0.1
    )
    head_loss = light_head_loss(model, outputs, batch, config)
    assert float(head_loss) > 0
    grads = torch.autograd.grad(retrieval, list(model.light_head.parameters()), allow_unused=True)
    assert all(g is None for g in grads)  # retrieval never reaches the head
    named = dict(model.named_parameters())
    grads = dict(
        zip(named, torch.autograd.grad(head_loss, list(named.values()), allow_unused=True))
    )
    for name in (
        "light_head.mlp.0.weight",
        "light_head.user_projection.weight",
        "user_tower.mlp.0.weight",
        "item_tower.mlp.0.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize(
    "key,value",
    [
        ("model.light_head.num_embeddings", "0"),
        ("model.light_head.loss_weight", "0"),
        ("model.light_head.num_knn_items", "5"),
        ("model.light_head.negatives_per_row", "512"),
        ("model.light_head.hidden", "[0]"),
    ],
)
def test_config_errors_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(
            None,
            ["model.light_head.enabled=true", "model.light_head.num_items=10", f"{key}={value}"],
        )


def _sharded_head_rank(rank: int, world_size: int, root: str) -> dict:
    root_path = Path(root)
    manifest = Manifest.load(root_path)
    config = _config(root, "sharding.sharding_types=[table_wise]", *HEAD)
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    seed_everything(0)
    reference = build_unsharded_model(manifest, config)
    sharded = build_sharded_model(manifest, config, env)
    copy_state_dict(sharded.state_dict(), reference.state_dict())
    optimizer = build_dense_optimizer(sharded, config)
    local = _batch(root_path, manifest, slice(rank * 16, rank * 16 + 16), config)
    losses = []
    for _ in range(2):  # DDP's static graph differs on its first iteration
        optimizer.zero_grad()
        outputs = sharded(local.user_features, local.item_features)
        loss = light_head_loss(sharded, outputs, local, config)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    with torch.no_grad():
        ref = reference(local.user_features, local.item_features)
        ref_loss = light_head_loss(reference, ref, local, config)
        first = sharded(local.user_features, local.item_features)
    head = {k: v.detach().clone() for k, v in sharded.module.light_head.state_dict().items()}
    return {
        "initial_close": abs(losses[0] - float(ref_loss)) < 1e-5,
        "ranker_user": first.ranker_user,
        "head": head,
        "reference_initial": reference.state_dict(),
    }


@pytest.mark.slow
def test_sharded_head_matches_unsharded(tmp_path: Path) -> None:
    """Same head loss at the start; after two steps on each rank's half, the same head
    parameters on both ranks as an unsharded model stepping on both halves (DDP mean)."""
    root = write_tiny_dataset(tmp_path / "data")
    results = run_distributed(_sharded_head_rank, 2, str(root))
    assert all(r["initial_close"] for r in results)
    torch.testing.assert_close(results[0]["head"], results[1]["head"])
    manifest = Manifest.load(root)
    config = _config(str(root), *HEAD)
    model = build_unsharded_model(manifest, config)
    model.load_state_dict(results[0]["reference_initial"])
    tables = ("sparse_arch", "sequence_arch")
    dense = [p for n, p in model.named_parameters() if not n.startswith(tables)]
    optimizer = torch.optim.AdamW(
        dense, lr=config.train.dense_lr, weight_decay=config.train.dense_weight_decay
    )
    table_optimizer = torch.optim.SGD(
        [p for n, p in model.named_parameters() if n.startswith(tables)], lr=0.5
    )
    for _ in range(2):
        optimizer.zero_grad()
        table_optimizer.zero_grad()
        for rank in range(2):
            batch = _batch(root, manifest, slice(rank * 16, rank * 16 + 16), config)
            outputs = model(batch.user_features, batch.item_features)
            (light_head_loss(model, outputs, batch, config) / 2).backward()
        optimizer.step()
        table_optimizer.step()
    for rank, result in enumerate(results):
        batch = _batch(root, manifest, slice(rank * 16, rank * 16 + 16), config)
        with torch.no_grad():
            expected = model(batch.user_features, batch.item_features).ranker_user
        torch.testing.assert_close(result["ranker_user"], expected, atol=1e-5, rtol=1e-4)
    expected_head = model.light_head.state_dict()
    torch.testing.assert_close(results[0]["head"], dict(expected_head), atol=1e-5, rtol=1e-4)


def _evaluate_rank(rank: int, world_size: int, root: str, run_dir: str) -> dict:
    manifest = Manifest.load(Path(root))
    config = _config(
        root, *HEAD, "model.light_head.num_knn_items=30", "model.light_head.num_items=10"
    )
    config.eval.ks = [5, 10]
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    seed_everything(0)
    model = build_sharded_model(manifest, config, env)
    return evaluate_model(model, manifest, config, env, Path(run_dir), split="valid")


@pytest.mark.slow
def test_evaluation_reports_reranked_list(tmp_path: Path) -> None:
    """Sharded evaluation (2 ranks) gains a ``reranked`` row with the model's metric names."""
    root = write_tiny_dataset(tmp_path / "data")
    results = run_distributed(_evaluate_rank, 2, str(root), str(tmp_path / "run"))
    for result in results:
        assert set(result["reranked"]) == set(result["model"])
        assert 0.0 <= result["reranked"]["hr@10"] <= 1.0
    assert results[0]["reranked"] == results[1]["reranked"]
