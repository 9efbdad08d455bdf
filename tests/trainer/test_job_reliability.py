"""Every job, not only retrieval training, has the loop's reliability behaviours: a stop signal
saves and stops (exit 128 + signal) and the run resumes where it stopped; a non-finite loss is
skipped on every rank (its batch saved) or halts, per the job's ``non_finite_loss``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from config import load_config
from tests.tiny_dataset import write_tiny_dataset
from trainer.runtime.checkpoint import latest_checkpoint
from trainer.runtime.distributed import shutdown
from trainer.runtime.step_guard import NonFiniteLossError

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "model.embedding_dim=16",
    "model.user_mlp=[32]",
    "model.item_mlp=[32]",
    "model.output_dim=16",
    "ranker.embedding_dim=8",
    "ranker.mlp=[16]",
    "ranker.cross_layers=1",
    "data.num_workers=0",
    "data.batch_size=32",
    "train.progress_bar=false",
    "train.log_every_steps=2",
    "ranker.train.progress_bar=false",
    "ranker.train.log_every_steps=2",
    "alignment.train.progress_bar=false",
    "alignment.train.log_every_steps=2",
    "logging.wandb=false",
    "eval.at_end=false",
]


def _job(module: str, args: list[str], fault: str | None) -> subprocess.CompletedProcess[str]:
    """``python -m module CONFIG args`` in a fresh process (``fault``: TWOTOWER_FAULT_SIGNAL);
    the config file holds only the seed, the arguments everything else."""
    env = {key: value for key, value in os.environ.items() if key != "TWOTOWER_FAULT_SIGNAL"}
    env["OMP_NUM_THREADS"] = "1"
    if fault is not None:
        env["TWOTOWER_FAULT_SIGNAL"] = fault
    run_dir = Path(next(a for a in args if a.startswith("run.dir=")).split("=", 1)[1])
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text("seed: 0\n")
    command = [sys.executable, "-m", module, str(config), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_ranker_signal_saves_then_stops_and_resumes(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "ranker"
    args = [f"run.dir={run_dir}", f"data.path={root}", *SMALL, "ranker.train.epochs=1"]
    stopped = _job("trainer.ranker_train", args, "0:3:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    # The signal arrives after step 3; step 4's vote sees it and the job saves there.
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-4"
    assert _summary(run_dir / "train_summary.json")["stopped_by_signal"] == signal.SIGTERM
    finished = _job("trainer.ranker_train", args, None)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = _summary(run_dir / "train_summary.json")
    assert summary["steps"] == 20 and summary["resumed_from"].endswith("step-4")


def test_alignment_signal_saves_then_stops_and_resumes(tmp_path: Path) -> None:
    from trainer.ranker_train import train_ranker
    from trainer.train import train

    root = write_tiny_dataset(tmp_path / "data")
    base, ranker = tmp_path / "base", tmp_path / "ranker"
    common = [f"data.path={root}", *SMALL]
    try:
        train(load_config(None, [*common, f"run.dir={base}", "train.max_steps=4"]))
        train_ranker(load_config(None, [*common, f"run.dir={ranker}", "ranker.train.max_steps=4"]))
    finally:
        shutdown()
    run_dir = tmp_path / "aligned"
    args = [
        f"run.dir={run_dir}",
        *common,
        f"checkpoint.resume_from={base}",
        f"alignment.reward_checkpoint={ranker}",
        "alignment.k=8",
        "alignment.top_n=3",
        "alignment.train.max_steps=6",
    ]
    stopped = _job("trainer.align", args, "0:2:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-3"
    summary = _summary(run_dir / "align_summary.json")
    assert summary["stopped_by_signal"] == signal.SIGTERM and "reward_after" not in summary
    finished = _job("trainer.align", args, None)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = _summary(run_dir / "align_summary.json")
    assert summary["steps"] == 6 and "reward_after" in summary


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_ranker_non_finite_loss_is_skipped_or_halts(
    policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.ranker_train as ranker_train

    original, calls = ranker_train.ranker_bce_loss, {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ranker_train, "ranker_bce_loss", poisoned)
    root = write_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "ranker"
    config = load_config(
        None,
        [f"data.path={root}", f"run.dir={run_dir}", *SMALL, "ranker.train.max_steps=6"]
        + [f"ranker.train.non_finite_loss={policy}"],
    )
    try:
        if policy == "halt":
            with pytest.raises(NonFiniteLossError, match="ranker.train.non_finite_loss=halt"):
                ranker_train.train_ranker(config)
        else:
            result = ranker_train.train_ranker(config)
            assert result.steps == 6 and result.skipped_steps == 1
    finally:
        shutdown()
    assert [p.name for p in (run_dir / "bad_batches").iterdir()] == ["step-3-rank-0.pt"]


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_alignment_non_finite_loss_is_skipped_or_halts(
    policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.align as align_module
    from trainer.ranker_train import train_ranker
    from trainer.train import train

    original, calls = align_module.alignment_loss, {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        result = original(*args, **kwargs)
        if calls["n"] != 3:
            return result
        return result._replace(loss=result.loss * float("nan"))

    root = write_tiny_dataset(tmp_path / "data")
    base, ranker, run_dir = tmp_path / "base", tmp_path / "ranker", tmp_path / "aligned"
    common = [f"data.path={root}", *SMALL]
    try:
        train(load_config(None, [*common, f"run.dir={base}", "train.max_steps=4"]))
        train_ranker(load_config(None, [*common, f"run.dir={ranker}", "ranker.train.max_steps=4"]))
        monkeypatch.setattr(align_module, "alignment_loss", poisoned)
        config = load_config(
            None,
            [*common, f"run.dir={run_dir}", f"checkpoint.resume_from={base}"]
            + [f"alignment.reward_checkpoint={ranker}", "alignment.k=8", "alignment.top_n=3"]
            + ["alignment.train.max_steps=6", f"alignment.train.non_finite_loss={policy}"],
        )
        if policy == "halt":
            with pytest.raises(NonFiniteLossError, match="alignment.train.non_finite_loss=halt"):
                align_module.align(config)
        else:
            result = align_module.align(config)
            assert result.steps == 6 and result.skipped_steps == 1
    finally:
        shutdown()
    assert [p.name for p in (run_dir / "bad_batches").iterdir()] == ["step-3-rank-0.pt"]
