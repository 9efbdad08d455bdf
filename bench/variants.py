"""Training throughput of every variant of an experiment file, side by side, as a ratio to the
first variant (e.g. in-batch softmax, or the bag-of-ids history), on one rank.

    python -m bench.variants [--experiments configs/experiments/negatives.yaml]
                            [--dataset synthetic] [--steps 200]

The sweep's samples/s column comes from full runs that may share the machine with other work;
this benchmark runs the variants one after another, each in its own process, for a fixed number
of steps and reports the median logged rate after the first window.
"""

from __future__ import annotations

import argparse

from bench.runs import samples_per_second
from bench.table import print_table
from launch.sweep import load_sweep

COLUMNS = ["variant", "samples/s", "ratio vs first"]


def run(experiments: str, dataset: str, steps: int) -> list[dict]:
    spec = load_sweep(experiments)
    base = spec.datasets[dataset]
    rows: list[dict] = []
    for variant in spec.variants:
        if variant.datasets and dataset not in variant.datasets:
            continue
        overrides = [o for o in base.overrides if not o.startswith("data.path=")]
        data = next(o.split("=", 1)[1] for o in base.overrides if o.startswith("data.path="))
        rate = samples_per_second(base.config, data, 1, steps, [*overrides, *variant.overrides])
        rows.append({"variant": variant.name, "samples/s": rate})
    for row in rows:
        row["ratio vs first"] = row["samples/s"] / rows[0]["samples/s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", default="configs/experiments/negatives.yaml")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"## Training samples/s per variant ({args.dataset}, {args.steps} steps, 1 rank)")
    print_table(run(args.experiments, args.dataset, args.steps), COLUMNS)


if __name__ == "__main__":
    main()
