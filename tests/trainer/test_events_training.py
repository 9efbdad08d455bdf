"""Your own log in three commands: the example shop log, ``twotower prepare events`` with its
mapping file, and training on 2 gloo ranks with ``configs/events.yaml``; the model must beat
most-popular on the held-out events (the world's shoppers favour two categories each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.datasets.example_log import write_example_log
from data_pipeline.manifest import Manifest
from launch.cli import main as cli_main
from tests.dist_helpers import run_distributed
from tests.trainer.test_train import _train_rank
from trainer.serving.export import export_run
from trainer.serving.retrieve import retrieve

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "events.yaml"


def prepared_example_log(root: Path, *flags: str, **sizes: int) -> Path:
    """The example shop log (``sizes``: its generator's) prepared by the CLI under ``root``."""
    log = write_example_log(root / "log", **sizes)
    data = root / "data"
    argv = ["prepare", "events", "--input", str(log / "events"), "--mapping"]
    assert cli_main([*argv, str(log / "mapping.yaml"), "--out", str(data), *flags]) == 0
    return data


@pytest.mark.slow
def test_own_log_trains_and_beats_most_popular(tmp_path: Path) -> None:
    data = prepared_example_log(tmp_path)
    overrides = [
        f"data.path={data}",
        f"run.dir={tmp_path / 'run'}",
        "loss.label_weights={click: 1.0, purchase: 2.0}",
        "train.progress_bar=false",
        "train.epochs=4",
    ]
    run_distributed(_train_rank, 2, overrides, str(CONFIG), timeout_s=600)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_queries"] == 600
    for name in ("hr@10", "ndcg@10"):
        # Beyond the interval: the model's lower 95% bound above most-popular's estimate.
        low = metrics["intervals"]["model"][name][0]
        assert low > metrics["popularity"][name], (name, metrics["model"], metrics["popularity"])
    # Served with the shop's own ids.
    run_distributed(_export_rank, 1, str(tmp_path / "run"), str(tmp_path / "export"))
    users = Manifest.load(data).split_paths(str(data), "test")[0]
    table = retrieve(tmp_path / "export", users, 5)
    raw_items = pq.read_table(data / "raw_ids" / "items.parquet").column("raw_item_id")
    assert np.array_equal(
        table.column("raw_item_id").to_numpy(zero_copy_only=False),
        raw_items.to_numpy(zero_copy_only=False)[table.column("item_id").to_numpy()],
    )
    assert table.column("raw_user_id")[0].as_py().startswith("shopper-")


def _export_rank(rank: int, world_size: int, run_dir: str, out_dir: str) -> None:
    export_run(run_dir, out_dir)
