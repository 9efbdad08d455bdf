"""One seed's sweep results with their 95% intervals, and another seed's value beside them.

``twotower sweep`` tables show mean ± standard deviation when an experiment ran several seeds;
this prints the table docs/experiments.md gives for such sweeps instead::

    python -m bench.seed_table runs/sweeps/features/synthetic hr@10 ndcg@10 recall@50 \\
        engaged:hr@10 engaged:ndcg@10 [--seed 0] [--other-seed 1]

Metrics are ``metrics.json`` keys; ``RULE:KEY`` reads the ``eval.also_exclude`` rule's entry.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trainer.runtime.run_files import METRICS_FILE


def _cell(metrics: dict[str, Any], column: str, ranking: str) -> str:
    rule, _, key = column.rpartition(":")
    source = metrics["by_exclusion"][rule] if rule else metrics
    value = source[ranking].get(key)
    interval = source["intervals"][ranking].get(key)
    if value is None:
        return "—"
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else f"{value:.4f}"


def table(dataset_dir: Path, columns: list[str], seed: int, other_seed: int | None) -> str:
    """Markdown: a row per variant in the sweep's order (its results.json), then most-popular."""
    variants = json.loads((dataset_dir / "results.json").read_text())["variants"]
    by_name: dict[str, dict[int, dict[str, Any]]] = {}
    for entry in variants:
        run_dir = Path(entry["run_dir"])
        path = run_dir / METRICS_FILE
        if entry["status"] == "ok" and path.exists() and run_dir.name.startswith("seed-"):
            by_name.setdefault(entry["name"], {})[int(run_dir.name[5:])] = json.loads(
                path.read_text()
            )
    header = ["variant", *columns] + (
        [f"HR@10 seed {other_seed}"] if other_seed is not None else []
    )
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    baseline = None
    for name, seeds in by_name.items():
        if seed not in seeds:
            continue
        baseline = baseline or seeds[seed]
        cells = [name, *(_cell(seeds[seed], c, "model") for c in columns)]
        if other_seed is not None:
            other = seeds.get(other_seed)
            cells.append(f"{other['model']['hr@10']:.4f}" if other else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        cells = ["most-popular", *(_cell(baseline, c, "popularity") for c in columns)]
        lines.append("| " + " | ".join(cells + (["—"] if other_seed is not None else [])) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir", type=Path, help="<sweep out>/<dataset> (has results.json)")
    parser.add_argument("columns", nargs="+", help="metrics.json keys, RULE:KEY for by_exclusion")
    parser.add_argument("--seed", type=int, default=0, help="seed shown (default: %(default)s)")
    parser.add_argument(
        "--other-seed", type=int, default=1, help="seed whose HR@10 is shown beside (default: 1)"
    )
    args = parser.parse_args()
    print(table(args.dataset_dir, args.columns, args.seed, args.other_seed))


if __name__ == "__main__":
    main()
