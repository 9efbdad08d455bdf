"""Ranker training end to end: it learns (loss down, AUC up on held-out data), its checkpoint
loads back into the same scores, sharded (2 gloo ranks) and unsharded rankers agree, and
config mistakes name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config import ConfigError, load_config
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from launch.cli import main as cli_main
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from trainer.ranker_build import load_ranker, ranker_first_row_batch
from trainer.ranker_eval import binary_auc, evaluate_ranker
from trainer.ranker_train import train_ranker
from trainer.runtime.distributed import DistributedEnv, init_distributed, shutdown
from trainer.runtime.run_files import RANKER_METRICS_FILE

FAST = [
    "ranker.embedding_dim=16",
    "ranker.mlp=[32]",
    "ranker.low_rank=4",
    "ranker.cross_layers=2",
    "data.num_workers=0",
    "data.recent_history=0",
    "ranker.train.progress_bar=false",
    "ranker.train.log_every_steps=10",
    "ranker.train.dense_lr=0.005",
    "ranker.train.sparse_lr=0.1",
    "logging.wandb=false",
]


def test_binary_auc_matches_pair_counting() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 5, (30,), generator=generator).double().numpy()  # many ties
        labels = (torch.rand(30, generator=generator) < 0.4).double().numpy()
        positive, negative = scores[labels == 1], scores[labels == 0]
        wins = (positive[:, None] > negative[None, :]).sum()
        ties = (positive[:, None] == negative[None, :]).sum()
        reference = (wins + 0.5 * ties) / (len(positive) * len(negative))
        assert binary_auc(scores, labels) == pytest.approx(reference)
    assert binary_auc(scores, labels * 0) != binary_auc(scores, labels * 0)  # NaN: one class


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ranker.cross_layerz=2", "ranker.cross_layerz"),
        ("ranker.low_rank=0", "ranker.low_rank"),
        ("ranker.mlp=[0]", "ranker.mlp"),
        ("ranker.sampled_negatives=-1", "ranker.sampled_negatives"),
        ("ranker.cross_layers=two", "ranker.cross_layers"),
    ],
)
def test_bad_ranker_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_cli_reports_a_bad_key_before_training(caplog: pytest.LogCaptureFixture) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "ranker_movielens_100k.yaml"
    assert cli_main(["train-ranker", str(config), "ranker.bogus=1"]) == 2
    assert "ranker.bogus" in caplog.text


def _world(tmp_path: Path) -> Path:
    from data_pipeline.datasets.synthetic import prepare_synthetic

    root = tmp_path / "world"
    prepare_synthetic(users=300, items=200, events=20_000, seed=0, out=root, history_length=10)
    return root


def test_learns_on_a_synthetic_world_and_reloads(tmp_path: Path) -> None:
    """Logged impressions (real negatives) plus sampled ones; the held-out split holds clicked
    impressions, so ``click`` AUC is clicked vs. random items and ``like`` ranks the clicks."""
    root = _world(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [
        f"data.path={root}",
        f"run.dir={run_dir}",
        "data.batch_size=256",
        "ranker.train.epochs=3",
        "ranker.sampled_negatives=2",
        "loss.label_weights={click: 1.0, like: 1.0}",
        *FAST,
    ]
    config = load_config(None, overrides)
    try:
        result = train_ranker(config)
        assert result.final_loss < 0.9 * result.first_loss
        assert result.metrics["auc/click"] > 0.6, result.metrics
        assert (run_dir / RANKER_METRICS_FILE).exists()
        manifest = Manifest.load(root)
        ranker = load_ranker(run_dir, manifest)
        assert not ranker.training
        assert not any(p.requires_grad for p in ranker.parameters())
        env = init_distributed()
        reloaded = evaluate_ranker(ranker, manifest, config, env)
        assert reloaded == pytest.approx(result.metrics, nan_ok=True)
    finally:
        shutdown()


def _sharded_vs_unsharded(rank: int, world_size: int, root: str, run_dir: str) -> dict:
    overrides = [
        f"data.path={root}",
        f"run.dir={run_dir}",
        "data.batch_size=32",
        "ranker.train.max_steps=4",
        "ranker.sampled_negatives=2",
        "eval.at_end=false",
        *FAST,
    ]
    config = load_config(None, overrides)
    train_ranker(config)  # the torchrun path: DMP, fused sparse optimizer, 2-rank checkpoint
    manifest = Manifest.load(root)
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    sharded = load_ranker(run_dir, manifest, env)
    unsharded = load_ranker(Path(run_dir) / "checkpoints" / "step-4", manifest)
    batch = ranker_first_row_batch(manifest, config, "train")
    store = ItemFeatureStore.load(root, manifest)
    items = store.lookup(torch.arange(0, 60, 7) + rank)  # ranks score different items
    # Frozen: no graph even with autograd on (a sharded table's fused optimizer never fires).
    pairs = [r.score(batch.user_features, batch.item_features) for r in (sharded, unsharded)]
    grids = [r.score_items(batch.user_features, items) for r in (sharded, unsharded)]
    return {
        "no_graph": not any(t.requires_grad for t in pairs + grids),
        "pairs_close": torch.allclose(pairs[0], pairs[1], atol=1e-5),
        "grids_close": torch.allclose(grids[0], grids[1], atol=1e-5),
        "grid_shape": tuple(grids[0].shape),
        "sharded": type(sharded.sparse_arch).__name__,
    }


@pytest.mark.slow
def test_sharded_and_unsharded_rankers_agree(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    results = run_distributed(_sharded_vs_unsharded, 2, str(root), str(tmp_path / "run"))
    for result in results:
        assert result["pairs_close"] and result["grids_close"] and result["no_graph"], result
        assert result["grid_shape"] == (1, 9, 2)
        assert result["sharded"] == "ShardedEmbeddingBagCollection"
    assert (tmp_path / "run" / "checkpoints" / "step-4" / ".complete").exists()


def test_resumes_from_its_latest_checkpoint(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    common = [
        f"data.path={root}",
        f"run.dir={tmp_path / 'run'}",
        "data.batch_size=32",
        "eval.at_end=false",
        "ranker.sampled_negatives=1",
        *FAST,
    ]
    try:
        first = train_ranker(load_config(None, [*common, "ranker.train.max_steps=4"]))
        assert first.resumed_from is None and first.steps == 4
        second = train_ranker(load_config(None, [*common, "ranker.train.max_steps=7"]))
        assert second.resumed_from == first.checkpoint  # mid-epoch: 20 steps per epoch
        assert second.steps == 7 and second.checkpoint.endswith("step-7")
    finally:
        shutdown()
