"""Validation during training: logged valid metrics, the best checkpoint (what the final
evaluation and ``twotower eval`` use), early stopping, resume, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import ConfigError, load_config
from data_pipeline.manifest import Manifest
from launch.plot import plot_run
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import TINY_MODEL, write_tiny_dataset
from trainer.evaluation.validation import check_metric
from trainer.runtime.checkpoint import best_checkpoint, latest_checkpoint, model_checkpoint
from trainer.runtime.run_logger import read_metrics
from trainer.train import train

# 640 training rows, 32 per rank and batch on 2 ranks: 10 steps per epoch.
TINY = [
    *TINY_MODEL,
    "train.log_every_steps=5",
    "loss.label_weights={click: 1.0, like: 0.5}",
    "eval.every_n_steps=5",
    "eval.early_stopping.metric=recall@10",
]


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> dict:
    result = train(load_config(None, overrides))
    return {"steps": result.steps, "best": result.best_step, "early": result.stopped_early}


def _valid_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "valid/recall@10" in r]


def test_best_checkpoint_kept_evaluated_and_resumed(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    common = [*TINY, f"data.path={root}", "train.epochs=2", "checkpoint.every_n_steps=10"]
    run = tmp_path / "whole"
    result = run_distributed(_train_rank, 2, [*common, f"run.dir={run}"])[0]
    records = _valid_records(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    values = [r["valid/recall@10"] for r in records]
    assert result["best"] == records[values.index(max(values))]["step"]
    best = best_checkpoint(run)
    assert best is not None
    assert json.loads((best / "meta.json").read_text())["step"] == result["best"]
    latest = latest_checkpoint(run)
    assert latest is not None and latest.name == "step-20"  # kept beside the best, for resume
    assert model_checkpoint(run) == best
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == "best" and metrics["split"] == "test"
    assert plot_run(run).stat().st_size > 1000  # loss, validation curves, final Recall@K
    # Stopped at step 10 and resumed: the same validations, the same best.
    cut = [*common, f"run.dir={tmp_path / 'cut'}"]
    run_distributed(_train_rank, 2, [*cut, "train.max_steps=10"])
    assert run_distributed(_train_rank, 2, cut)[0]["best"] == result["best"]
    resumed = _valid_records(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [5, 10, 15, 20]
    for again, first in zip(resumed, records, strict=True):
        assert again == pytest.approx(first)


def test_early_stopping_after_patience(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    # No gain can exceed min_delta = 2 (recall is at most 1): the first validation sets the best,
    # the next two count against patience 2, and training stops there.
    overrides = [
        *TINY,
        f"data.path={root}",
        f"run.dir={run}",
        "train.epochs=5",
        "eval.early_stopping.patience=2",
        "eval.early_stopping.min_delta=2.0",
    ]
    result = run_distributed(_train_rank, 2, overrides)[0]
    assert result == {"steps": 15, "best": 5, "early": True}
    assert [r["step"] for r in _valid_records(run)] == [5, 10, 15]


def test_unknown_selection_metric_and_split_are_config_errors(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    bad = load_config(None, [f"data.path={root}", "eval.early_stopping.metric=ndcg@100"])
    with pytest.raises(ConfigError, match="eval.early_stopping.metric"):
        check_metric(bad, manifest)
    missing = load_config(None, [f"data.path={root}", "eval.valid_split=holdout"])
    with pytest.raises(ConfigError, match="eval.valid_split"):
        check_metric(missing, manifest)
    with pytest.raises(ConfigError, match="eval.early_stopping.patience"):
        load_config(None, ["eval.early_stopping.patience=0"])
