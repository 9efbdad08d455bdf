"""The plain-PyTorch baseline is the same model as the TorchRec two-tower: with the TorchRec
model's initial weights it computes the same loss, and after the same training steps (fused table
optimizer vs the plain sparse optimizer, DMP vs DDP) it still does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from bench.plain_two_tower import build_plain_model, step_context
from config import load_config
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from tests.trainer.test_sharded_vs_unsharded import copy_state_dict
from trainer.build import batch_builder, build_dense_optimizer, build_sharded_model, label_weights
from trainer.negatives.negative_sampling import NegativeSampling
from trainer.runtime.distributed import DistributedEnv, seed_everything
from trainer.step import StepContext, train_step

STEPS, ROWS = 3, 10  # 3 steps x 2 ranks x 10 rows fit the first 64-row group


def _train_both(rank: int, world_size: int, root: str, optimizer: str, sparse: bool) -> dict:
    """Losses of STEPS steps of each model on this rank's batches, from the same weights."""
    manifest = Manifest.load(Path(root))
    config = load_config(
        None,
        [
            f"data.path={root}",
            "model.embedding_dim=16",
            "model.user_mlp=[32]",
            "model.item_mlp=[32]",
            "model.output_dim=8",
            f"train.sparse_optimizer={optimizer}",
            "train.sparse_lr=0.5",  # large steps, so a wrong table update shows in the loss
            "loss.label_weights={click: 1.0, like: 0.5}",
        ],
    )
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    seed_everything(0)
    plain = build_plain_model(manifest, config, sparse_gradients=sparse)
    torchrec = build_sharded_model(manifest, config, env)
    copy_state_dict(torchrec.state_dict(), plain.state_dict())
    plain_ddp = DistributedDataParallel(plain)
    contexts = {
        "plain": (plain_ddp, step_context(plain_ddp, manifest, config, env)),
        "torchrec": (
            torchrec,
            StepContext(
                build_dense_optimizer(torchrec, config),
                label_weights(manifest, config),
                NegativeSampling.build(config, manifest, env),
                manifest,
                config,
                env,
            ),
        ),
    }
    units = list_work_units(manifest.split_paths(root, "train"))
    table = read_unit(units[0], None)
    losses: dict[str, list[float]] = {name: [] for name in contexts}
    for step in range(STEPS):
        start = (step * world_size + rank) * ROWS
        batch = batch_builder(manifest, config)(table.slice(start, ROWS))
        for name, (model, context) in contexts.items():
            losses[name].append(float(train_step(model, batch, step, context).loss))
    return losses


@pytest.mark.parametrize(
    ("optimizer", "world_size", "sparse"),
    [
        ("sgd", 1, True),
        ("rowwise_adagrad", 1, True),
        ("rowwise_adagrad", 2, True),
        ("rowwise_adagrad", 2, False),
    ],
)
def test_plain_baseline_matches_torchrec(
    tmp_path: Path, optimizer: str, world_size: int, sparse: bool
) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    for losses in run_distributed(_train_both, world_size, str(root), optimizer, sparse):
        torch.testing.assert_close(losses["plain"], losses["torchrec"], atol=1e-5, rtol=1e-4)
        assert losses["plain"][0] != losses["plain"][-1]  # the steps did train
