"""A small shop log in the shape users bring: string ids, a CSV and a Parquet part, a timestamp,
click / purchase labels and a catalog with brand, category, tags and titles.

    python -m data_pipeline.datasets.example_log --out example_log

writes ``events/part-0.parquet``, ``events/part-1.csv``, ``catalog.csv`` and ``mapping.yaml``
(the column mapping for ``twotower prepare events --mapping``). Each shopper favours two of the
categories and browses them mostly (with a little random exploration), choosing items by
popularity within a category; clicks lead to purchases at a rate per item. A retrieval model
that learns the shoppers' categories beats most-popular on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

CATEGORIES = ("shoes", "bags", "coats", "hats", "socks", "belts", "scarves", "gloves")
BRANDS = ("northwind", "acme", "globex", "initech", "umbrella", "hooli")
ADJECTIVES = ("red", "blue", "leather", "wool", "light", "classic", "slim", "warm")
MAPPING = """\
user: shopper
item: product
timestamp: event_time
labels: [click, purchase]
min_user_events: 3
items:
  path: catalog.csv
  key: product
  categorical: [brand, category]
  lists: [tags]
  text: [title]
"""


def write_example_log(
    out: Path, shoppers: int = 600, products: int = 400, events: int = 24_000, seed: int = 0
) -> Path:
    """Write the example under ``out`` (module docstring); returns ``out``."""
    rng = np.random.default_rng(seed)
    category = rng.integers(0, len(CATEGORIES), products)
    popularity = rng.pareto(2.0, products) + 1.0
    favourites = np.stack([rng.choice(len(CATEGORIES), 2, replace=False) for _ in range(shoppers)])
    shopper = rng.integers(0, shoppers, events)
    explore = rng.random(events) < 0.15
    wanted = np.where(
        explore,
        rng.integers(0, len(CATEGORIES), events),
        favourites[shopper, rng.integers(0, 2, events)],
    )
    product = np.empty(events, dtype=np.int64)
    for c in range(len(CATEGORIES)):
        members = np.flatnonzero(category == c)
        chosen = np.flatnonzero(wanted == c)
        weights = popularity[members] / popularity[members].sum()
        product[chosen] = rng.choice(members, chosen.size, p=weights)
    event_time = np.sort(1_735_689_600 + rng.integers(0, 90 * 86_400, events))
    click = (rng.random(events) < 0.7).astype(np.int64)
    purchase = click * (rng.random(events) < rng.uniform(0.05, 0.4, products)[product])
    log = pa.table(
        {
            "shopper": [f"shopper-{s:04d}" for s in shopper],
            "product": [f"P{p:05d}" for p in product],
            "event_time": pa.array(event_time * 1000, pa.timestamp("ms")),
            "click": click,
            "purchase": purchase.astype(np.int64),
        }
    )
    (out / "events").mkdir(parents=True, exist_ok=True)
    half = events // 2
    pq.write_table(log.slice(0, half), out / "events" / "part-0.parquet")
    pa_csv.write_csv(log.slice(half), out / "events" / "part-1.csv")
    catalog = pa.table(
        {
            "product": [f"P{p:05d}" for p in range(products)],
            "brand": [BRANDS[p % len(BRANDS)] for p in range(products)],
            "category": [CATEGORIES[c] for c in category],
            "tags": [
                f"{CATEGORIES[c]}|{ADJECTIVES[p % len(ADJECTIVES)]}" for p, c in enumerate(category)
            ],
            "title": [
                f"{ADJECTIVES[(p * 3) % len(ADJECTIVES)]} {CATEGORIES[c]} by {BRANDS[p % len(BRANDS)]}"
                for p, c in enumerate(category)
            ],
        }
    )
    pa_csv.write_csv(catalog, out / "catalog.csv")
    (out / "mapping.yaml").write_text(MAPPING)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (required)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    out = write_example_log(args.out, seed=args.seed)
    print(f"wrote an example shop log to {out} (events/, catalog.csv, mapping.yaml)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
