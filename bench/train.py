"""Training throughput (samples/s) of the TorchRec two-tower at 1 and 2 gloo ranks.

    python -m bench.train --data data/synthetic --config configs/synthetic.yaml [--steps 300]

Each run goes through the real launcher (torchrun) and reads samples/s from the run's metrics
log, skipping the first logging window (warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.table import print_table
from launch.local import torchrun_command
from trainer.run_logger import read_metrics


def samples_per_second(config: str, data: str, nproc: int, steps: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"data.path={data}",
            f"run.dir={run_dir}",
            f"train.max_steps={steps}",
            "train.log_every_steps=25",
            "eval.at_end=false",
            "logging.wandb=false",
            "train.progress_bar=false",
            "train.epochs=100",
            *extra,
        ]
        subprocess.run(
            torchrun_command(nproc, config, overrides),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rates = [r["samples_per_s"] for r in read_metrics(Path(run_dir)) if "samples_per_s" in r]
    return statistics.median(rates[1:] or rates)


def run(config: str, data: str, steps: int, extra: list[str] | None = None) -> list[dict]:
    rows = []
    for nproc in (1, 2):
        rate = samples_per_second(config, data, nproc, steps, extra or [])
        rows.append({"ranks": nproc, "samples/s": rate})
    for row in rows:
        row["ratio vs 1 rank"] = row["samples/s"] / rows[0]["samples/s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print_table(
        run(args.config, args.data, args.steps, args.overrides),
        ["ranks", "samples/s", "ratio vs 1 rank"],
    )


if __name__ == "__main__":
    main()
