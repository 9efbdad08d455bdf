"""The one training loop under every job: a run stopped mid-way and resumed equals an
uninterrupted one (the logged losses, the rows trained and every tensor of the final
checkpoint), for the ranker, alignment and the plain-PyTorch baseline as for retrieval
(``test_checkpoint.py``); a 2-rank job that loses a rank restarts elastically and ends where an
uninterrupted one does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.plain_two_tower import train_plain
from config import ExperimentConfig, load_config
from launch.local import torchrun_command
from tests.tiny_dataset import write_tiny_dataset
from tests.trainer.test_checkpoint import _full_tensors
from trainer.align import align
from trainer.ranker_train import train_ranker
from trainer.runtime.distributed import shutdown
from trainer.runtime.run_logger import read_metrics
from trainer.train import train

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
    "logging.wandb=false",
    "eval.at_end=false",
    "checkpoint.every_n_steps=3",
]
# Each job's own loop section: quiet, small windows, and a schedule over the whole run (the
# resumed part must continue it).
for _section in ("train", "ranker.train", "alignment.train"):
    SMALL += [
        f"{_section}.progress_bar=false",
        f"{_section}.log_every_steps=2",
        f"{_section}.lr_schedule.warmup_steps=3",
        f"{_section}.lr_schedule.decay=cosine",
        f"{_section}.lr_schedule.decay_steps=12",
    ]
ALIGN = ["alignment.k=8", "alignment.top_n=3"]


def _losses(run_dir: Path) -> list[dict[str, Any]]:
    """The complete logging windows' records, without their (timing) samples/s."""
    windows = [r for r in read_metrics(run_dir) if "loss" in r and "samples_per_s" in r]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in windows]


def _state(checkpoint: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's shared tensors (model, optimizers, samplers), not RNG or rank parts."""
    return {k: v for k, v in _full_tensors(Path(checkpoint), tmp).items() if ".rng." not in k}


def _start_runs(root: Path, tmp: Path) -> list[str]:
    """A retrieval run and a ranker run for alignment to start from."""
    common = [f"data.path={root}", *SMALL]
    try:
        train(load_config(None, [*common, f"run.dir={tmp / 'base'}", "train.max_steps=4"]))
        train_ranker(
            load_config(None, [*common, f"run.dir={tmp / 'rk'}", "ranker.train.max_steps=4"])
        )
    finally:
        shutdown()
    return [f"checkpoint.resume_from={tmp / 'base'}", f"alignment.reward_checkpoint={tmp / 'rk'}"]


def _plain(config: ExperimentConfig) -> Any:
    return train_plain(config, sparse_gradients=True)


# job -> (entry point, overrides for the whole run, overrides that stop it part-way)
JOBS: dict[str, tuple[Callable[[ExperimentConfig], Any], list[str], list[str]]] = {
    "ranker": (train_ranker, ["ranker.train.max_steps=12"], ["ranker.train.max_steps=7"]),
    "alignment": (
        align,
        [*ALIGN, "alignment.train.max_steps=12"],
        [*ALIGN, "alignment.train.max_steps=7"],
    ),
    "plain": (
        _plain,
        ["train.max_steps=12", "features.groups=[id,history,categorical]"],
        ["train.max_steps=7", "features.groups=[id,history,categorical]"],
    ),
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_resumed_job_equals_uninterrupted(job: str, tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    entry, whole_args, part_args = JOBS[job]
    common = [f"data.path={root}", *SMALL]
    if job == "alignment":
        common += _start_runs(root, tmp_path)
    whole_dir, parted_dir = tmp_path / "whole", tmp_path / "parted"
    try:
        whole = entry(load_config(None, [*common, *whole_args, f"run.dir={whole_dir}"]))
        entry(load_config(None, [*common, *part_args, f"run.dir={parted_dir}"]))
        rest = entry(load_config(None, [*common, *whole_args, f"run.dir={parted_dir}"]))
    finally:
        shutdown()
    assert whole.steps == rest.steps == 12
    assert _losses(parted_dir) == _losses(whole_dir)
    assert len(_losses(whole_dir)) == 6
    first, second = _state(rest.checkpoint, tmp_path), _state(whole.checkpoint, tmp_path)
    assert sorted(first) == sorted(second)
    assert any(k.startswith("dense_optimizer.") for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def _torchrun(module: str, config: Path, overrides: list[str], env: dict[str, str]) -> int:
    """Runs ``module`` under torchrun on 2 ranks with elastic restarts (output to a file: a
    killed rank's loader may hold an inherited pipe open); returns its exit code."""
    log = config.with_suffix(".log")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TWOTOWER_DIST_TIMEOUT_S": "90", **env}
    with open(log, "w") as output:
        process = subprocess.Popen(
            torchrun_command(2, str(config), overrides, module=module, max_restarts=2),
            env=full_env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-3000:]
    return code


@pytest.mark.slow
@pytest.mark.parametrize("job", ["ranker", "alignment"])
def test_job_losing_a_rank_restarts_elastically_and_ends_as_uninterrupted(
    job: str, tmp_path: Path
) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    module = {"ranker": "trainer.ranker_train", "alignment": "trainer.align"}[job]
    overrides = [f"data.path={root}", *SMALL, *JOBS[job][1], "ranker.train.epochs=2"]
    if job == "alignment":
        overrides += _start_runs(root, tmp_path)
    summary = "align_summary.json" if job == "alignment" else "train_summary.json"
    runs = {}
    for name, env in (("whole", {}), ("killed", {"TWOTOWER_FAULT_KILL": "1:5"})):
        run_dir, config = tmp_path / name, tmp_path / f"{name}.yaml"
        config.write_text("seed: 0\n")
        _torchrun(module, config, [*overrides, f"run.dir={run_dir}"], env)
        runs[name] = json.loads((run_dir / summary).read_text())
    assert runs["whole"]["steps"] == runs["killed"]["steps"] == 12
    assert runs["killed"]["resumed_from"].endswith("step-3")
    # The lost rank's restart resumes from step 3 and trains steps 4.. again, logged once.
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
    first = _state(runs["killed"]["checkpoint"], tmp_path)
    second = _state(runs["whole"]["checkpoint"], tmp_path)
    for key in first:
        assert torch.equal(first[key], second[key]), key
