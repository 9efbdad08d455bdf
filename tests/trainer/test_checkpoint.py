"""Checkpoint and resume: equivalence with uninterrupted runs, resharding, keep-last-k, signals,
SIGKILL and elastic restarts, non-finite losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from config import load_config
from data_pipeline.manifest import Manifest
from launch.local import torchrun_command
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import TINY_MODEL, write_tiny_dataset
from trainer.runtime.checkpoint import (
    COMPLETE,
    CheckpointLayoutError,
    complete_checkpoints,
    latest_checkpoint,
)
from trainer.runtime.run_logger import read_metrics
from trainer.runtime.step_guard import NonFiniteLossError
from trainer.train import DIGEST_MODULUS, train

TINY = [
    *TINY_MODEL,
    "train.epochs=2",
    "train.log_every_steps=2",
    "loss.label_weights={click: 1.0, like: 0.5}",
    # Replicated and per-rank sampler state both travel through the checkpoint.
    "negatives.log_q.enabled=true",
    "negatives.memory.size=64",
]
PARTS = ("model", "sparse_optimizer", "dense_optimizer", "samplers")


def _full_tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, unsharded, by flattened key."""
    target = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, target)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    walk("", torch.load(target, weights_only=True))
    return flat


def _assert_same_state(a: Path, b: Path, tmp: Path, parts: tuple[str, ...] = PARTS) -> None:
    first, second = _full_tensors(a, tmp), _full_tensors(b, tmp)
    keys = sorted(k for k in first if k.split(".")[0] in parts)
    assert keys == sorted(k for k in second if k.split(".")[0] in parts)
    assert any(k.startswith("sparse_optimizer.") for k in keys)
    assert any(k.startswith("dense_optimizer.") for k in keys)
    for key in keys:
        assert torch.equal(first[key], second[key]), key


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def _split_digest(root: Path, split: str = "train") -> int:
    """The trainer's row digest of every row of a split, straight from the Parquet files."""
    manifest = Manifest.load(root)
    total = 0
    for path in manifest.split_paths(root, split):
        table = pq.read_table(path, columns=["user_id", "item_id"])
        users = table.column("user_id").to_numpy().astype(np.int64) % DIGEST_MODULUS
        items = table.column("item_id").to_numpy().astype(np.int64)
        mixed = (users * 1_000_003 + items * 7_919) % DIGEST_MODULUS
        total = (total + int(mixed.sum())) % DIGEST_MODULUS
    return total


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "train_summary.json").read_text())


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    # A warm-up and cosine schedule over the whole run: the resumed half continues it.
    schedule = [
        "train.lr_schedule.warmup_steps=6",
        "train.lr_schedule.decay=cosine",
        "train.lr_schedule.decay_steps=40",
    ]
    common = [*TINY, *schedule, f"data.path={root}", "checkpoint.every_n_steps=5"]
    whole = train(load_config(None, [*common, f"run.dir={tmp_path / 'whole'}"]))
    parted_dir = tmp_path / "parted"
    first = train(load_config(None, [*common, f"run.dir={parted_dir}", "train.max_steps=13"]))
    assert first.steps == 13 and first.resumed_from is None
    rest = train(load_config(None, [*common, f"run.dir={parted_dir}"]))
    assert rest.resumed_from is not None and rest.resumed_from.endswith("step-13")
    assert (rest.steps, rest.rows_trained) == (whole.steps, whole.rows_trained) == (40, 2 * 640)
    assert rest.row_digest == whole.row_digest == 2 * _split_digest(root) % DIGEST_MODULUS
    assert _losses(parted_dir) == _losses(tmp_path / "whole")
    _assert_same_state(Path(rest.checkpoint), Path(whole.checkpoint), tmp_path)
    metrics = [
        json.loads((d / "metrics.json").read_text()) for d in (parted_dir, tmp_path / "whole")
    ]
    assert metrics[0]["model"] == metrics[1]["model"]


def test_keep_last_k_and_partial_checkpoints_are_ignored(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.path={root}", f"run.dir={run_dir}", "eval.at_end=false"]
    overrides += ["checkpoint.every_n_steps=4", "checkpoint.keep_last=2", "train.max_steps=14"]
    train(load_config(None, overrides))
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-12", "step-14"]
    # A save interrupted mid-write (no marker) is never picked up.
    partial = run_dir / "checkpoints" / "step-99"
    partial.mkdir()
    (partial / "meta.json").write_text("{}")
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-14"
    assert not (partial / COMPLETE).exists()
    resumed = train(load_config(None, [*overrides[:-1], "train.max_steps=16"]))
    assert resumed.resumed_from == str(run_dir / "checkpoints" / "step-14")
    assert resumed.steps == 16
    # A checkpoint of another parts layout (an earlier version's) is refused by name, and kept.
    meta_file = run_dir / "checkpoints" / "step-16" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["layout"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointLayoutError, match="step-16: written with checkpoint layout 1"):
        train(load_config(None, [*overrides[:-1], "train.max_steps=18"]))
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-16"


def test_async_save_writes_the_same_checkpoints(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    common = [*TINY, f"data.path={root}", "eval.at_end=false", "train.max_steps=10"]
    common += ["checkpoint.every_n_steps=4", "checkpoint.keep_last=5"]
    sync = train(load_config(None, [*common, f"run.dir={tmp_path / 'sync'}"]))
    overlapped = [*common, f"run.dir={tmp_path / 'async'}", "checkpoint.async_save=true"]
    later = train(load_config(None, overlapped))
    for step in (4, 8, 10):
        names = [tmp_path / run / "checkpoints" / f"step-{step}" for run in ("sync", "async")]
        assert all((n / COMPLETE).exists() for n in names)
        _assert_same_state(*names, tmp_path, parts=(*PARTS, "rank0"))
    assert later.checkpoint.endswith("step-10") and sync.checkpoint.endswith("step-10")


def _trainer_process(
    config: Path, args: list[str], extra_env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    command = [sys.executable, "-m", "trainer.train", str(config), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_signal_saves_then_stops_and_the_run_resumes(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text("seed: 0\n")
    args = [*TINY, f"data.path={root}", f"run.dir={run_dir}", "eval.at_end=false"]
    stopped = _trainer_process(config, args, {"TWOTOWER_FAULT_SIGNAL": "0:5:SIGTERM"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    # The signal arrives after step 5; the ranks see it in step 6's vote and save there.
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-6"
    assert _summary(run_dir)["stopped_by_signal"] == signal.SIGTERM
    finished = _trainer_process(config, args, {})
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["steps"] == 40 and summary["rows_trained"] == 2 * 640
    assert summary["resumed_from"].endswith("step-6")


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    result = train(load_config(None, overrides))
    return {"steps": result.steps, "checkpoint": result.checkpoint}


@pytest.mark.slow
@pytest.mark.parametrize("saved_ranks,loaded_ranks", [(2, 1), (1, 2)])
def test_checkpoint_reshards_across_world_sizes(
    tmp_path: Path, saved_ranks: int, loaded_ranks: int
) -> None:
    """Tables, both optimizers and sampler state load unchanged at another world size."""
    root = write_tiny_dataset(tmp_path / "data")
    common = [*TINY, f"data.path={root}", "eval.at_end=false", "train.max_steps=6"]
    source = tmp_path / "source"
    saved = run_distributed(_train_rank, saved_ranks, [*common, f"run.dir={source}"])[0]
    # Resuming with nothing left to train re-saves exactly what was loaded.
    copy = tmp_path / "copy"
    moved = [*common, f"run.dir={copy}", f"checkpoint.resume_from={source}"]
    loaded = run_distributed(_train_rank, loaded_ranks, moved)[0]
    assert loaded["steps"] == 6
    _assert_same_state(Path(saved["checkpoint"]), Path(loaded["checkpoint"]), tmp_path)
    # ... and training goes on at the new world size.
    more = run_distributed(_train_rank, loaded_ranks, [*moved[:-1], "train.max_steps=9"])[0]
    assert more["steps"] == 9


def _torchrun(
    root: Path, run_dir: Path, extra_env: dict[str, str], max_restarts: int = 0
) -> tuple[int, str]:
    """Runs the trainer under torchrun on 2 ranks; returns (exit code, log tail).

    Output goes to a file, not a pipe: a rank killed mid-run leaves its loader's forkserver
    behind for a moment, holding any inherited pipe open. The job runs in its own session and
    whatever is left of it is killed afterwards."""
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text("seed: 0\n")
    overrides = [*TINY, f"data.path={root}", f"run.dir={run_dir}", "checkpoint.every_n_steps=4"]
    # Loader workers in-process: a killed rank's worker processes (children of a forkserver, not
    # of the rank) outlive it for a while, which stalls the restart on this 2-core box.
    overrides.append("data.num_workers=0")
    # A restarted rank can hang joining gloo (seen on this 2-core box): with a bound, it fails and
    # the elastic agent tries again instead of waiting torch's 30 minutes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TWOTOWER_DIST_TIMEOUT_S": "90", **extra_env}
    log = run_dir.parent / f"{run_dir.name}-{len(list(run_dir.parent.glob('*.log')))}.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            torchrun_command(2, str(config), overrides, max_restarts=max_restarts),
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()[-3000:]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_restart_equals_uninterrupted_two_ranks(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    code, log = _torchrun(root, tmp_path / "whole", {})
    assert code == 0, log
    code, log = _torchrun(root, tmp_path / "killed", {"TWOTOWER_FAULT_KILL": "1:7"})
    assert code != 0, log
    assert latest_checkpoint(tmp_path / "killed") == tmp_path / "killed/checkpoints/step-4"
    code, log = _torchrun(root, tmp_path / "killed", {})
    assert code == 0, log
    a, b = _summary(tmp_path / "killed"), _summary(tmp_path / "whole")
    assert a["resumed_from"].endswith("step-4")
    assert (a["steps"], a["rows_trained"], a["row_digest"]) == (
        b["steps"],
        b["rows_trained"],
        b["row_digest"],
    )
    assert a["row_digest"] == 2 * _split_digest(root) % DIGEST_MODULUS
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
    _assert_same_state(Path(a["checkpoint"]), Path(b["checkpoint"]), tmp_path)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("killed", "whole")]
    assert metrics[0]["model"] == metrics[1]["model"]


@pytest.mark.slow
def test_elastic_restart_after_a_lost_rank_trains_every_row_once(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "elastic"
    code, log = _torchrun(root, run_dir, {"TWOTOWER_FAULT_KILL": "1:7"}, max_restarts=3)
    assert code == 0, log
    summary = _summary(run_dir)
    assert summary["resumed_from"].endswith("step-4")
    assert summary["steps"] == 20
    assert summary["rows_trained"] == 2 * 640
    assert summary["row_digest"] == 2 * _split_digest(root) % DIGEST_MODULUS
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == sorted(set(steps))  # every step logged once


def _nan_at(rank: int, world_size: int, overrides: list[str], bad_rank: int, bad_step: int):
    import trainer.step as step_module

    original = step_module.retrieval_loss
    calls = {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = original(*args, **kwargs)
        calls["n"] += 1
        if rank == bad_rank and calls["n"] == bad_step + 1:
            return loss * float("nan")
        return loss

    step_module.retrieval_loss = poisoned
    try:
        result = train(load_config(None, overrides))
    except NonFiniteLossError as error:
        return {"error": str(error)}
    return {"steps": result.steps, "skipped": result.skipped_steps, "rows": result.rows_trained}


@pytest.mark.slow
def test_non_finite_loss_is_skipped_on_every_rank_or_halts(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "skip"
    common = [*TINY, f"data.path={root}", "eval.at_end=false", "train.epochs=1"]
    results = run_distributed(_nan_at, 2, [*common, f"run.dir={run_dir}"], 1, 3)
    # 10 steps of 2 x 32 rows; the skipped step trains neither rank's batch.
    assert results[0] == results[1] == {"steps": 10, "skipped": 1, "rows": 640 - 64}
    saved = sorted(p.name for p in (run_dir / "bad_batches").iterdir())
    assert saved == ["step-4-rank-1.pt"]
    batch = torch.load(run_dir / "bad_batches" / saved[0], weights_only=True)
    assert batch["item_ids"].shape == (32,) and "user_values" in batch
    halted = run_distributed(
        _nan_at,
        2,
        [*common, f"run.dir={tmp_path / 'halt'}", "train.non_finite_loss=halt"],
        0,
        2,
    )
    for outcome in halted:
        assert "step 3: non-finite loss" in outcome["error"]
        assert "train.non_finite_loss=halt" in outcome["error"]


def test_resume_without_sampler_state(tmp_path: Path) -> None:
    """No logQ, no memory: the checkpoint has no sampler entries and still resumes."""
    root = write_tiny_dataset(tmp_path / "data")
    plain = [o for o in TINY if not o.startswith("negatives.")]
    overrides = [*plain, f"data.path={root}", f"run.dir={tmp_path / 'run'}", "eval.at_end=false"]
    train(load_config(None, [*overrides, "train.max_steps=3"]))
    resumed = train(load_config(None, [*overrides, "train.max_steps=5"]))
    assert resumed.resumed_from is not None and resumed.steps == 5
