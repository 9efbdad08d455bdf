"""Where do cold targets land? Ranks of held-out items with few training events, per run.

``cold Recall@K`` in evaluation is often 0 when warm, popular items fill every top K; this asks
how far the content features move cold targets up all the same, side by side over runs:

    python -m bench.cold_items RUN_DIR [RUN_DIR ...] [--max-events 5]

For each run (its latest checkpoint, one process): the evaluation split's rows whose target has
fewer than ``--max-events`` training events, the target's rank among the whole corpus (1 = top)
and among the cold items only (the usual cold-start protocol), as median rank and Recall@K.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bench.table import print_table
from data_pipeline.schema import ITEM_ID
from data_pipeline.split_table import read_split_columns
from trainer.build import batch_builder
from trainer.evaluation.corpus import embed_corpus
from trainer.evaluation.metrics import cold_items
from trainer.features import resolve_features
from trainer.runtime.distributed import init_distributed
from trainer.serving.export import load_run_model

KS = (10, 50, 100)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """scores [Q, N], targets [Q] column indices -> [Q] 1-based ranks (ties count above)."""
    target = scores.gather(1, targets[:, None])
    return (scores >= target).sum(dim=1).numpy()


def cold_report(run_dir: Path, max_events: int) -> dict[str, object]:
    """One row of the table for ``run_dir``."""
    model, manifest, config, meta = load_run_model(run_dir)
    env = init_distributed()
    counts = np.bincount(
        read_split_columns(config.data.path, manifest, "train", [ITEM_ID])
        .column(ITEM_ID)
        .to_numpy(),
        minlength=manifest.tables[ITEM_ID],
    )
    cold = cold_items(counts, max_events)
    names = list(resolve_features(manifest, config).schema.event_arrow_schema().names)
    rows = read_split_columns(config.data.path, manifest, config.eval.split, names)
    targets = rows.column(ITEM_ID).to_numpy()
    rows = rows.filter(pa.array(cold[targets]))
    name = run_dir.name if run_dir.name != "seed-0" else run_dir.parent.name
    if rows.num_rows == 0:
        return {"run": name, "step": meta["step"], "cold rows": 0}
    with torch.no_grad():
        ids, items = embed_corpus(model, manifest, config, env)
        users = model(*_features(manifest, config, rows)).user
    scores = users @ items.T
    column = {int(i): c for c, i in enumerate(ids.tolist())}
    target_columns = torch.tensor([column[int(i)] for i in rows.column(ITEM_ID).to_numpy()])
    everywhere = target_ranks(scores, target_columns)
    cold_columns = torch.tensor([c for c, i in enumerate(ids.tolist()) if cold[i]])
    among_cold = target_ranks(
        scores[:, cold_columns],
        torch.searchsorted(cold_columns, target_columns),
    )
    row: dict[str, object] = {
        "run": name,
        "step": meta["step"],
        "cold rows": len(everywhere),
        "median rank": float(np.median(everywhere)),
        "median rank among cold": float(np.median(among_cold)),
    }
    for k in KS:
        row[f"R@{k} among cold"] = float((among_cold <= k).mean())
    return row


def _features(manifest, config, rows: pa.Table):  # type: ignore[no-untyped-def]
    batch = batch_builder(manifest, config)(rows)
    return batch.user_features, batch.item_features


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--max-events", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [cold_report(run, args.max_events) for run in args.runs]
    columns = ["run", "cold rows", "median rank", "median rank among cold"]
    print_table(rows, columns + [f"R@{k} among cold" for k in KS])


if __name__ == "__main__":
    main()
