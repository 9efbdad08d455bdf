"""Debiased example weights: the math, the stop-gradients, on/off, and sharded vs unsharded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config import ConfigError, DebiasConfig, DebiasMode, load_config
from data_pipeline.manifest import Manifest
from models.debias import (
    DebiasEstimates,
    PositionValueEstimate,
    debiased_weights,
    masked_mse,
    position_buckets,
    remove_estimate,
)
from models.losses import in_batch_softmax_loss, net_user_value
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from tests.trainer.test_sharded_vs_unsharded import _batch, _config, copy_state_dict
from trainer.build import build_dense_optimizer, build_sharded_model, build_unsharded_model
from trainer.runtime.distributed import DistributedEnv, seed_everything

POSITION = ["model.debias.position.enabled=true", "model.debias.position.buckets=6"]
USER = ["model.debias.user.enabled=true", "model.debias.user.hidden_dim=8"]
LABEL_WEIGHTS = torch.tensor([1.0, 0.5])
TABLES = ("sparse_arch", "sequence_arch")


def _debias_config(*overrides: str) -> DebiasConfig:
    return load_config(None, list(overrides)).model.debias


def test_position_buckets_clip_deep_and_keep_unknown_apart() -> None:
    position = torch.tensor([0, 1, 4, 5, 9, -1])
    assert position_buckets(position, 5).tolist() == [0, 1, 4, 4, 4, 5]


def test_divide_and_subtract_math_and_clamps() -> None:
    weights = torch.tensor([2.0, 1.0, 0.0, 3.0])
    estimate = torch.tensor([0.5, 2.0, 0.4, 0.001])
    divided = remove_estimate(weights, estimate, DebiasMode.DIVIDE, 0.01, 100.0)
    # the estimate floor (min_estimate) bounds the last row at 3 / 0.01
    torch.testing.assert_close(divided, torch.tensor([4.0, 0.5, 0.0, 300.0]).clamp_max(100.0))
    capped = remove_estimate(weights, estimate, DebiasMode.DIVIDE, 0.01, 3.0)
    torch.testing.assert_close(capped, torch.tensor([3.0, 0.5, 0.0, 3.0]))
    subtracted = remove_estimate(weights, estimate, DebiasMode.SUBTRACT, 0.01, 100.0)
    torch.testing.assert_close(subtracted, torch.tensor([1.5, 0.0, 0.0, 2.999]))  # >= 0


def test_masked_mse_ignores_padding_rows() -> None:
    estimate = torch.tensor([1.0, 2.0, 5.0])
    target = torch.tensor([0.0, 2.0, 0.0])
    mse = masked_mse(estimate, target, torch.tensor([1.0, 1.0, 0.0]))
    assert float(mse) == pytest.approx(0.5)


def test_no_estimates_leave_net_user_value() -> None:
    value = torch.tensor([0.0, 1.0, 1.5])
    result = debiased_weights(value, DebiasEstimates(), _debias_config(), torch.ones(3))
    torch.testing.assert_close(result.weights, value)
    assert float(result.aux_loss) == 0.0


@pytest.mark.parametrize("mode", ["divide", "subtract"])
def test_position_then_user_chain(mode: str) -> None:
    """The user head regresses (and divides) the position-debiased weight."""
    config = _debias_config(
        f"model.debias.position.mode={mode}", f"model.debias.user.mode={mode}", *POSITION, *USER
    )
    value = torch.tensor([2.0, 1.0, 0.0, 3.0])
    position, user = torch.tensor([0.5, 0.25, 0.5, 1.0]), torch.tensor([2.0, 1.0, 1.0, 0.5])
    result = debiased_weights(value, DebiasEstimates(position, user), config, torch.ones(4))
    if mode == "divide":
        after_position = value / position
        expected = after_position / user
    else:
        after_position = (value - position).clamp_min(0)
        expected = (after_position - user).clamp_min(0)
    torch.testing.assert_close(result.weights, expected)
    aux = ((position - value) ** 2).mean() + ((user - after_position) ** 2).mean()
    torch.testing.assert_close(result.aux_loss, aux)


def test_position_head_learns_mean_value_per_bucket() -> None:
    head = PositionValueEstimate(buckets=3)
    position = torch.tensor([0, 0, 1, 1, 2, 5, -1, -1])
    value = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.4, 2.0, 2.0])
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        masked_mse(head(position), value, torch.ones(8)).backward()
        optimizer.step()
    expected = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.3, 0.3, 2.0, 2.0])
    torch.testing.assert_close(head(position).detach(), expected, atol=1e-3, rtol=0)


def test_position_head_learning_rate_scale() -> None:
    """The scale multiplies how far one Adam step moves the estimate, not where it starts."""
    position, value = torch.tensor([0, 0, 1]), torch.tensor([1.0, 1.0, 0.5])
    moved = []
    for scale in (1.0, 10.0):
        head = PositionValueEstimate(buckets=2, learning_rate_scale=scale)
        assert (head(position) == 0).all()
        optimizer = torch.optim.Adam(head.parameters(), lr=0.002)
        masked_mse(head(position), value, torch.ones(3)).backward()
        optimizer.step()
        moved.append(head(position).detach())
    torch.testing.assert_close(moved[1], 10 * moved[0])
    torch.testing.assert_close(moved[0], torch.full((3,), 0.002), atol=1e-5, rtol=0)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'model.debias.position.min_estimate'"):
        load_config(None, [*POSITION, "model.debias.position.min_estimate=0"])
    with pytest.raises(ConfigError, match="'model.debias.user.max_weight'"):
        load_config(None, [*USER, "model.debias.user.max_weight=-1"])
    with pytest.raises(ConfigError, match="'model.debias.position.mode'"):
        load_config(None, ["model.debias.position.mode=multiply"])
    with pytest.raises(ConfigError, match="'model.debias.position.buckets'"):
        load_config(None, [*POSITION, "model.debias.position.buckets=0"])
    with pytest.raises(ConfigError, match="'model.debias.position.learning_rate_scale'"):
        load_config(None, [*POSITION, "model.debias.position.learning_rate_scale=0"])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("debias") / "data")


@pytest.mark.parametrize(
    ("parts", "heads"),
    [
        ([], set()),
        (POSITION, {"position"}),
        (USER, {"user"}),
        ([*POSITION, *USER], {"position", "user"}),
    ],
)
def test_each_part_on_and_off(tiny_root: Path, parts: list[str], heads: set[str]) -> None:
    manifest = Manifest.load(tiny_root)
    config = _config(str(tiny_root), *parts)
    model = build_unsharded_model(manifest, config)
    batch = _batch(tiny_root, manifest, slice(0, 8), config)
    outputs = model(batch.user_features, batch.item_features, None, batch.position)
    present = {name for name, value in outputs.debias._asdict().items() if value is not None}
    assert present == heads
    names = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("debias.")}
    assert names == heads
    assert all(v.shape == (8,) for v in outputs.debias if v is not None)
    without_position = model(batch.user_features, batch.item_features).debias
    assert without_position.position is None


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {name: p.grad for name, p in model.named_parameters()}


def _is_zero(grad: torch.Tensor | None) -> bool:
    return grad is None or not bool(grad.any())


@pytest.mark.parametrize("mode", ["divide", "subtract"])
def test_gradients_reach_only_their_parameters(tiny_root: Path, mode: str) -> None:
    manifest = Manifest.load(tiny_root)
    modes = [f"model.debias.position.mode={mode}", f"model.debias.user.mode={mode}"]
    config = _config(str(tiny_root), *POSITION, *USER, *modes)
    torch.manual_seed(0)
    model = build_unsharded_model(manifest, config)
    batch = _batch(tiny_root, manifest, slice(0, 16), config)
    # a non-zero start, so the estimates actually shape the weights
    with torch.no_grad():
        for p in model.debias.parameters():
            p.normal_(0.1, 0.05)
    outputs = model(batch.user_features, batch.item_features, None, batch.position)
    value = net_user_value(batch.labels, LABEL_WEIGHTS)
    debiased = debiased_weights(value, outputs.debias, config.model.debias, batch.weight)
    assert not torch.equal(debiased.weights, value)
    retrieval = in_batch_softmax_loss(
        outputs.user, outputs.item, batch.item_ids, debiased.weights, config.model.temperature
    )
    retrieval_grads = _grads(model, retrieval)
    aux_grads = _grads(model, debiased.aux_loss)
    for name, grad in retrieval_grads.items():
        if name.startswith("debias."):
            assert _is_zero(grad), f"retrieval loss reached {name}"
        elif name.startswith(("user_tower", "item_tower")):
            assert not _is_zero(grad), f"retrieval loss missed {name}"
    for name, grad in aux_grads.items():
        if name.startswith("debias."):
            assert not _is_zero(grad), f"debias MSE missed {name}"
        else:
            assert _is_zero(grad), f"debias MSE reached {name}"
    assert any(n.startswith(TABLES) for n in aux_grads)  # the tables were checked too


def _debias_loss(model, batch, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss (retrieval with debiased weights + the heads' MSE) and the stacked
    estimates [parts, B]."""
    outputs = model(batch.user_features, batch.item_features, None, batch.position)
    value = net_user_value(batch.labels, LABEL_WEIGHTS)
    debiased = debiased_weights(value, outputs.debias, config.model.debias, batch.weight)
    retrieval = in_batch_softmax_loss(
        outputs.user,
        outputs.item,
        batch.item_ids,
        debiased.weights * batch.weight,
        config.model.temperature,
    )
    estimates = torch.stack([e.detach() for e in outputs.debias if e is not None])
    return estimates, retrieval + debiased.aux_loss


def _sharded_rank(rank: int, world_size: int, root: str, extra: list[str]) -> dict:
    root_path = Path(root)
    manifest = Manifest.load(root_path)
    config = _config(root, *extra)
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    seed_everything(0)
    reference = build_unsharded_model(manifest, config)
    with torch.no_grad():
        for p in reference.debias.parameters():
            p.normal_(0.3, 0.1)
    sharded = build_sharded_model(manifest, config, env)
    copy_state_dict(sharded.state_dict(), reference.state_dict())
    local = _batch(root_path, manifest, slice(rank * 16, rank * 16 + 16), config)
    with torch.no_grad():
        expected, _ = _debias_loss(reference, local, config)
    optimizer = build_dense_optimizer(sharded, config)
    optimizer.zero_grad()
    estimates, loss = _debias_loss(sharded, local, config)
    loss.backward()
    optimizer.step()
    return {
        "estimates_close": torch.allclose(estimates, expected, atol=1e-5),
        "state": {k: v.clone() for k, v in sharded.state_dict().items() if "debias" in k},
        "reference_initial": {k: v.clone() for k, v in reference.state_dict().items()},
    }


def _reference_debias_step(root: str, initial: dict, extra: list[str]) -> dict:
    """Unsharded model, one step over both halves, gradients averaged as DDP does."""
    manifest = Manifest.load(Path(root))
    config = _config(root, *extra)
    model = build_unsharded_model(manifest, config)
    model.load_state_dict(initial)
    dense = [p for n, p in model.named_parameters() if not n.startswith(TABLES)]
    optimizer = torch.optim.AdamW(dense, lr=config.train.dense_lr)
    for rank in range(2):
        batch = _batch(Path(root), manifest, slice(rank * 16, rank * 16 + 16), config)
        _, loss = _debias_loss(model, batch, config)
        (loss / 2).backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "debias" in k}


@pytest.mark.slow
def test_sharded_heads_match_unsharded(tiny_root: Path) -> None:
    """Same estimates, and the same head parameters after one data-parallel step (DDP
    averages the heads' gradients over ranks like the towers')."""
    extra = [
        *POSITION,
        *USER,
        "model.debias.position.mode=divide",
        "model.debias.user.mode=subtract",
        "sharding.sharding_types=[table_wise]",
    ]
    results = run_distributed(_sharded_rank, 2, str(tiny_root), extra)
    assert all(r["estimates_close"] for r in results)
    expected = _reference_debias_step(str(tiny_root), results[0]["reference_initial"], extra)
    assert expected
    for result in results:
        assert result["state"].keys() == expected.keys()
        for name, value in result["state"].items():
            torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    from trainer.runtime.run_logger import read_metrics
    from trainer.train import train

    config = load_config(None, overrides)
    train(config)
    return [r["loss"] for r in read_metrics(Path(config.run.dir)) if "loss" in r]


@pytest.mark.slow
def test_training_loop_with_both_parts_on_two_ranks(tiny_root: Path, tmp_path: Path) -> None:
    """The real step (DMP, DDP static graph, fused table optimizer) with the heads on."""
    from tests.trainer.test_train import TINY

    overrides = [
        *TINY,
        *POSITION,
        *USER,
        "model.debias.user.mode=subtract",
        f"data.path={tiny_root}",
        f"run.dir={tmp_path / 'run'}",
        "eval.at_end=false",
    ]
    losses = run_distributed(_train_rank, 2, overrides)[0]
    assert len(losses) > 3 and all(torch.isfinite(torch.tensor(losses)))
