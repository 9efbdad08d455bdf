"""Training throughput (samples/s): the TorchRec two-tower against TorchRec's own retrieval
example (``--peer``) and against a plain-PyTorch baseline.

    python -m bench.train --peer --data data/synthetic-1m [--batch-size 1024 4096 16384]
        [--ranks 1 2] [--threads 1] [--families logged_bce softmax] [--steps 100]
    python -m bench.train --data data/synthetic [--config configs/synthetic.yaml] [--steps 300]
        [--ranks 1 2] [--repeats 1] [key=value ...]
    python -m bench.train --data data/synthetic --profile [--steps 60] [--implementations torchrec]

Config overrides (``key=value``) follow ``--`` when a list flag (``--batch-size``, ``--ranks``,
``--families``, ``--implementations``) comes last. ``--peer``: see ``bench.train_peer``. Otherwise every implementation runs the trainer's own step
and loop on the same Parquet loader and ``Batch`` objects, launched by torchrun at each rank
count (gloo on CPU): the TorchRec model (sharded ``EmbeddingBagCollection``, fused table
optimizer, DMP) and ``bench.plain_two_tower`` (``nn.EmbeddingBag``, the matching PyTorch
optimizer, DDP) with sparse and with dense table gradients; the ratio is against the faster of
the two plain baselines. samples/s is read from each run's metrics log, skipping the first
logging window (warm-up); with ``--repeats`` the best run counts. Runs alternate between the
implementations so that load from other processes hits both alike.

``--profile`` instead trains both in this process (one rank) under ``torch.profiler`` and
prints each one's top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bench import train_peer
from bench.runs import IMPLEMENTATIONS, TORCHREC, samples_per_second
from bench.table import print_table
from bench.train_profile import BUILDERS, profile
from config import LossFamily

COLUMNS = ["implementation", "ranks", "samples/s", "ratio vs best plain PyTorch"]


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
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=list(BUILDERS),
        default=list(BUILDERS),
        help="which implementations --profile trains",
    )
    parser.add_argument(
        "--peer", action="store_true", help="side by side with TorchRec's retrieval example"
    )
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument(
        "--families",
        nargs="+",
        choices=[family.value for family in LossFamily],
        default=["logged_bce", "softmax"],
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per rank, both sides")
    parser.add_argument(
        "overrides", nargs="*", help="config key=value overrides (after --, following a list flag)"
    )
    args = parser.parse_args()
    if not Path(args.data, "manifest.json").exists():
        raise SystemExit(f"{args.data}: prepare a dataset first (twotower prepare synthetic ...)")
    if args.peer:
        rows = train_peer.run(
            args.config,
            args.data,
            args.steps,
            tuple(args.batch_size),
            tuple(args.ranks),
            tuple(args.families),
            args.threads,
            args.overrides,
        )
        print_table(rows, train_peer.COLUMNS)
        return
    if args.profile:
        logging.basicConfig(level=logging.WARNING)
        profile(
            args.config,
            args.data,
            args.steps,
            args.overrides,
            args.top,
            tuple(args.implementations),
        )
        return
    rows = run(args.config, args.data, args.steps, args.overrides, tuple(args.ranks), args.repeats)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
