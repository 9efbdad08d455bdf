"""Uneven data over 2 gloo ranks: training and evaluation finish and count every row once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import load_config
from data_pipeline.manifest import Manifest
from data_pipeline.reader import assign_work_units, list_work_units
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import add_empty_file, write_tiny_dataset
from tests.trainer.test_train import TINY
from trainer.train import train

# 641 rows in 64-row groups: files of 320 + 320 + 1 rows, 11 row groups. Over 2 ranks
# one reads 6 row groups and the other 5, and each ends the epoch on a short batch.
TRAIN_ROWS = 641
WORKERS = 1


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> int:
    return train(load_config(None, overrides)).rows_trained


def _rows_per_rank(root: Path, epoch: int, seed: int) -> list[int]:
    units = list_work_units(Manifest.load(root).split_paths(root, "train"))
    return [
        sum(
            unit.rows
            for worker in range(WORKERS)
            for unit in assign_work_units(
                units,
                epoch=epoch,
                seed=seed,
                rank=rank,
                world_size=2,
                worker_id=worker,
                num_workers=WORKERS,
                shuffle=True,
            )
        )
        for rank in range(2)
    ]


@pytest.mark.slow
def test_uneven_ranks_train_and_evaluate_every_row(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", train_rows=TRAIN_ROWS)
    # The test split: an empty file first, then one 40-row group, so rank 1 holds no query at
    # all and evaluates on padding built from the first non-empty row group.
    add_empty_file(root, "test")
    manifest = Manifest.load(root)
    epochs = 2
    for epoch in range(epochs):
        per_rank = _rows_per_rank(root, epoch, seed=0)
        assert sum(per_rank) == TRAIN_ROWS and per_rank[0] != per_rank[1]
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        f"data.path={root}",
        f"run.dir={run_dir}",
        "data.num_workers=0",
        f"train.epochs={epochs}",
        "seed=0",
    ]
    rows = run_distributed(_train_rank, 2, overrides, timeout_s=240)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["rows_trained"] == rows[0] == epochs * manifest.splits["train"].rows
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["num_queries"] == manifest.splits["test"].rows == 40
