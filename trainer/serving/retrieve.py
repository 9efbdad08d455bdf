"""``twotower retrieve --export DIR --users FILE --k K [--out FILE]``: top-K items for user rows
from an export folder (``trainer.serving.export``), with no training code or checkpoint involved.

User rows (a Parquet file or folder with the user-side columns of the event data, e.g. a split)
become user features through the data pipeline's ``BatchBuilder``, go through the exported user
program, and are answered by exact maximum inner product search (``trainer.mips.exact_topk``)
against the exported item index: the same ranking evaluation computes, without its exclusion of
the user's earlier items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from config import load_config
from data_pipeline.batch import BatchBuilder
from data_pipeline.manifest import Manifest
from data_pipeline.raw_ids import read_raw_ids
from data_pipeline.schema import ITEM_ID, USER_ID, SchemaError
from trainer.build import batch_builder
from trainer.mips import exact_topk
from trainer.runtime.run_files import CONFIG_FILE
from trainer.serving.export import EXPORT_MANIFEST, program_inputs, read_item_index

ROW = "row"


@dataclass
class ExportedModel:
    """A loaded export folder.

    Args:
        info: ``export.json``.
        user_program: (values [sum(lengths)], lengths [F, B]) -> [B, D] user embeddings.
        builder: Arrow rows -> user features, as in training and evaluation.
        item_ids: [N] int64, ascending.
        item_embeddings: [N, D] float32.
        raw_ids: ``{"users": [U], "items": [I]}`` raw id per dense id, where the dataset has
            them (``data_pipeline.raw_ids``).
    """

    info: dict[str, Any]
    user_program: nn.Module
    builder: BatchBuilder
    item_ids: torch.Tensor
    item_embeddings: torch.Tensor
    raw_ids: dict[str, np.ndarray]


def load_export(export_dir: str | Path) -> ExportedModel:
    """Read an export folder; errors name the missing file."""
    export_dir = Path(export_dir)
    info_path = export_dir / EXPORT_MANIFEST
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path}: not an export folder (run `twotower export`)")
    info = json.loads(info_path.read_text())
    manifest = Manifest.load(export_dir / "dataset")
    builder = batch_builder(manifest, load_config(export_dir / CONFIG_FILE))
    expected = [f.name for f in builder.schema.user_features()]
    if expected != info["user_features"]:
        raise ValueError(
            f"{info_path}: user_features {info['user_features']} differ from the features the "
            f"exported config builds {expected}"
        )
    program_path = export_dir / info["user_program"]["file"]
    if not program_path.exists():
        raise FileNotFoundError(f"{program_path}: exported user program missing")
    program = torch.export.load(program_path).module()
    item_ids, item_embeddings = read_item_index(export_dir / info["item_index"])
    raw_ids = read_raw_ids(manifest, export_dir / "dataset")
    return ExportedModel(info, program, builder, item_ids, item_embeddings, raw_ids)


@torch.no_grad()
def embed_users(exported: ExportedModel, users: pa.Table) -> torch.Tensor:
    """Rows [Q] of user columns -> user embeddings [Q, D] float32, in batches of the export's
    ``batch_size`` (evaluation's batch size)."""
    batch_size = int(exported.info["batch_size"])
    outputs = [torch.zeros(0, int(exported.info["embedding_dim"]))]
    for start in range(0, users.num_rows, batch_size):
        features = exported.builder.user_features(users.slice(start, batch_size))
        outputs.append(exported.user_program(*program_inputs(features)).float())
    return torch.cat(outputs)


def read_users(path: Path) -> pa.Table:
    """The Parquet file (or folder of files) of user rows."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such users file")
    return pq.read_table(path)


def retrieve(export_dir: str | Path, users_path: str | Path, k: int) -> pa.Table:
    """Top-``k`` items of every row of ``users_path``; returns ``ranking_table``'s table.

    Raises:
        SchemaError: naming the users file and the user feature columns it lacks.
    """
    users_path = Path(users_path)
    exported = load_export(export_dir)
    users = read_users(users_path)
    try:
        queries = embed_users(exported, users)
    except SchemaError as error:
        raise SchemaError(f"{users_path}: {error}") from error
    scores, ids = exact_topk(queries, exported.item_embeddings, k, corpus_ids=exported.item_ids)
    user_ids = users.column(USER_ID).to_numpy() if USER_ID in users.column_names else None
    return with_raw_ids(ranking_table(scores, ids, user_ids), exported.raw_ids)


def with_raw_ids(table: pa.Table, raw_ids: dict[str, np.ndarray]) -> pa.Table:
    """``table`` (:func:`ranking_table`) with ``raw_user_id`` / ``raw_item_id`` beside the dense
    ids, where the export has the maps."""
    for side, column, name in (
        ("users", USER_ID, "raw_user_id"),
        ("items", ITEM_ID, "raw_item_id"),
    ):
        if side in raw_ids and column in table.column_names:
            dense = table.column(column).to_numpy()
            position = table.column_names.index(column) + 1
            table = table.add_column(position, name, pa.array(raw_ids[side][dense]))
    return table


def ranking_table(
    scores: torch.Tensor, ids: torch.Tensor, user_ids: np.ndarray | None = None
) -> pa.Table:
    """One row per (query, rank): ``row`` (the query's row in the users file), ``user_id`` when
    known, ``rank`` (0-based), ``item_id``, ``score``; empty slots (k > items) are dropped.

    Args:
        scores: [Q, k] float32; ids: [Q, k] int64 (-1 for empty slots); user_ids: [Q] or None.
    """
    queries, k = ids.shape
    rows = np.repeat(np.arange(queries, dtype=np.int64), k)
    ranks = np.tile(np.arange(k, dtype=np.int32), queries)
    flat_ids = ids.reshape(-1).numpy()
    keep = flat_ids >= 0
    columns: dict[str, Any] = {ROW: rows[keep]}
    if user_ids is not None:
        columns[USER_ID] = np.asarray(user_ids, dtype=np.int64)[rows[keep]]
    columns["rank"] = ranks[keep]
    columns[ITEM_ID] = flat_ids[keep]
    columns["score"] = scores.reshape(-1).numpy()[keep]
    return pa.table(columns)


def format_rankings(table: pa.Table, shown: int = 10) -> str:
    """One line per query: its row, user id and first ``shown`` item ids (raw where known)."""
    rows = table.column(ROW).to_numpy()
    item_column = "raw_item_id" if "raw_item_id" in table.column_names else ITEM_ID
    items = table.column(item_column).to_numpy(zero_copy_only=False)
    user_column = "raw_user_id" if "raw_user_id" in table.column_names else USER_ID
    has_user = user_column in table.column_names
    users = table.column(user_column).to_numpy(zero_copy_only=False) if has_user else None
    lines = []
    for row in np.unique(rows):
        mask = rows == row
        user = f" user {users[mask][0]}" if users is not None else ""
        ranked = " ".join(str(i) for i in items[mask][:shown])
        more = " ..." if mask.sum() > shown else ""
        lines.append(f"row {row}{user}: {ranked}{more}")
    return "\n".join(lines)
