"""Training throughput (samples/s): the TorchRec two-tower against a plain-PyTorch baseline.

    python -m bench.train --data data/synthetic [--config configs/synthetic.yaml] [--steps 300]
        [--ranks 1 2] [--repeats 1] [key=value ...]
    python -m bench.train --data data/synthetic --profile [--steps 60]

Every implementation runs the trainer's own step and loop on the same Parquet loader and
``Batch`` objects, launched by torchrun at each rank count (gloo on CPU): the TorchRec model
(sharded ``EmbeddingBagCollection``, fused table optimizer, DMP) and ``bench.plain_two_tower``
(``nn.EmbeddingBag``, the matching PyTorch optimizer, DDP) with sparse and with dense table
gradients; the ratio is against the faster of the two plain baselines. samples/s is read from each run's metrics log, skipping the first logging
window (warm-up); with ``--repeats`` the best run counts. Runs alternate between the
implementations so that load from other processes hits both alike.

``--profile`` instead trains both in this process (one rank) under ``torch.profiler`` and
prints each one's top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.table import print_table
from bench.train_profile import profile, run_overrides
from launch.local import torchrun_command
from trainer.runtime.run_logger import read_metrics

COLUMNS = ["implementation", "ranks", "samples/s", "ratio vs best plain PyTorch"]
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
) -> float:
    module, arguments = IMPLEMENTATIONS[implementation]
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [*run_overrides(data, run_dir, steps, extra), *arguments]
        command = torchrun_command(nproc, config, overrides, module=module)
        log = Path(run_dir, "stderr.log")
        # A file, not a pipe: loader worker processes can outlive the run and hold a pipe open.
        with open(log, "w") as stderr:
            code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr).returncode
        if code != 0:
            raise RuntimeError(
                f"{module} at {nproc} rank(s) exited {code}:\n{log.read_text()[-3000:]}"
            )
        rates = [r["samples_per_s"] for r in read_metrics(Path(run_dir)) if "samples_per_s" in r]
    return statistics.median(rates[1:] or rates)


def run(
    config: str,
    data: str,
    steps: int,
    extra: list[str] | None = None,
    ranks: tuple[int, ...] = (1, 2),
    repeats: int = 1,
) -> list[dict]:
    """One row per (implementation, ranks), keyed by ``COLUMNS``; the ratio is against the
    faster plain-PyTorch baseline at the same rank count."""
    best: dict[tuple[str, int], float] = {}
    for _ in range(repeats):
        for nproc in ranks:
            for name in IMPLEMENTATIONS:
                rate = samples_per_second(config, data, nproc, steps, extra or [], name)
                best[name, nproc] = max(best.get((name, nproc), 0.0), rate)
    rows = []
    for nproc in ranks:
        plain = max(best[name, nproc] for name in IMPLEMENTATIONS if name != TORCHREC)
        for name in IMPLEMENTATIONS:
            rate = best[name, nproc]
            rows.append(
                {
                    "implementation": name,
                    "ranks": nproc,
                    "samples/s": rate,
                    "ratio vs best plain PyTorch": rate / plain,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs each")
    parser.add_argument("--profile", action="store_true", help="profile one rank instead")
    parser.add_argument("--top", type=int, default=15, help="operators per profile table")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    if not Path(args.data, "manifest.json").exists():
        raise SystemExit(f"{args.data}: prepare a dataset first (twotower prepare synthetic ...)")
    if args.profile:
        logging.basicConfig(level=logging.WARNING)
        profile(args.config, args.data, args.steps, args.overrides, args.top)
        return
    rows = run(args.config, args.data, args.steps, args.overrides, tuple(args.ranks), args.repeats)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
