"""What the training benchmarks share: the overrides of a training-only run and the samples/s
its metrics log records."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from launch.local import torchrun_command
from trainer.runtime.run_logger import read_metrics
from trainer.runtime.threads import ThreadChoice, thread_environment


def training_only_overrides(
    data: str, run_dir: str | Path, steps: int, extra: list[str]
) -> list[str]:
    """Training only, for ``steps`` steps: no validation (not even the final one that picks
    the best step), no final evaluation, no wandb, no progress bar; ``extra`` last (so it
    wins)."""
    return [
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"train.max_steps={steps}",
        "train.epochs=100",
        "train.log_every_steps=25",
        "train.progress_bar=false",
        "eval.every_epoch=false",
        "eval.every_n_steps=null",  # else a final validation picks the best step
        "eval.at_end=false",
        "logging.wandb=false",
        *extra,
    ]


def logged_samples_per_second(run_dir: str | Path) -> float:
    """Median samples/s of the run's logging windows, the first (warm-up) left out."""
    rates = [r["samples_per_s"] for r in read_metrics(Path(run_dir)) if "samples_per_s" in r]
    if not rates:
        raise RuntimeError(f"{run_dir}: the metrics log has no samples_per_s record")
    return statistics.median(rates[1:] or rates)


def run_overrides(data: str, run_dir: str, steps: int, extra: list[str]) -> list[str]:
    """:func:`training_only_overrides` on the features both implementations of ``bench.train``
    read: the plain PyTorch baseline mirrors plain id features only (no weighted tables or dense
    counters)."""
    groups = "features.groups=[id,history,categorical]"
    return training_only_overrides(data, run_dir, steps, [groups, *extra])


TORCHREC = "torchrec"
# Implementation -> (torchrun entry point, its arguments after the config overrides).
IMPLEMENTATIONS: dict[str, tuple[str, list[str]]] = {
    TORCHREC: ("trainer.train", []),
    "plain pytorch, sparse table grads": ("bench.plain_two_tower", []),
    "plain pytorch, dense table grads": ("bench.plain_two_tower", ["--dense-table-gradients"]),
}


def samples_per_second(
    config: str,
    data: str,
    nproc: int,
    steps: int,
    extra: list[str],
    implementation: str = TORCHREC,
    threads_per_rank: int | None = None,
) -> float:
    """Global samples/s of one torchrun launch (``threads_per_rank``: intra-op threads of each
    rank, None: the trainer's own choice, cores / ranks)."""
    module, arguments = IMPLEMENTATIONS[implementation]
    env = dict(os.environ)
    if threads_per_rank is not None:
        env.update(thread_environment(ThreadChoice(threads_per_rank, "bench.train")))
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [*run_overrides(data, run_dir, steps, extra), *arguments]
        command = torchrun_command(nproc, config, overrides, module=module)
        log = Path(run_dir, "stderr.log")
        # A file, not a pipe: loader worker processes can outlive the run and hold a pipe open.
        with open(log, "w") as stderr:
            code = subprocess.run(
                command, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            ).returncode
        if code != 0:
            raise RuntimeError(
                f"{module} at {nproc} rank(s) exited {code}:\n{log.read_text()[-3000:]}"
            )
        return logged_samples_per_second(run_dir)
