"""Export and retrieval: a tiny run trained on 2 gloo ranks, exported in one process (DCP
reshards), answers the same top-K as evaluation's path through the live model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from config import ConfigError, load_config
from data_pipeline.manifest import Manifest
from data_pipeline.schema import ITEM_ID, SchemaError, Side
from data_pipeline.split_table import read_split_columns
from launch.cli import main as cli_main
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import ITEMS, TINY_MODEL, USERS, write_tiny_dataset
from trainer.build import batch_builder
from trainer.evaluation.corpus import rank_rows
from trainer.mips import exact_topk
from trainer.runtime.distributed import init_distributed
from trainer.serving.export import (
    EXAMPLE_INPUT,
    FAISS_INDEX,
    ITEM_INDEX,
    export_run,
    load_run_model,
    read_item_index,
)
from trainer.serving.retrieve import embed_users, load_export, retrieve
from trainer.train import train

K = 20
TINY = [
    *TINY_MODEL,
    "data.num_workers=0",
    "train.epochs=1",
    "eval.at_end=false",
    "loss.label_weights={click: 1.0, like: 0.5}",
]
VARIANTS = {
    "pooled": ["data.recent_history=3"],
    "history": [
        "model.history.enabled=true",
        "model.history.encoder=self_attention",
        "data.recent_history=0",
    ],
    # Every feature kind (weighted search tokens and affinities on the user side, so the
    # exported program's weights input matters; text and a dense counter on the item side).
    "all_kinds": ["data.recent_history=3"],
    # The `make demo` feature groups: weighted text on the item side only, so the user tower's
    # weighted bags are all empty in every served batch.
    "demo_groups": ["data.recent_history=3", "features.groups=[id,history,categorical,text]"],
    # Trained on windows (sequence mode), served per row: causal attention, relative positions.
    "sequence_mode": [
        "model.history.enabled=true",
        "model.history.max_length=5",
        "model.history.recency_buckets=0",
        "model.history.causal=true",
        "model.history.positions=relative",
        "model.history.summary=newest",
        "model.history.packed=true",
        "data.recent_history=0",
        "data.batch_size=8",
    ],
}
ALL_KINDS_VARIANTS = ("all_kinds", "demo_groups")


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> int:
    return train(load_config(None, overrides)).steps


def without_history(rows: pa.Table) -> pa.Table:
    """``rows`` with every history list column (``hist_*``) emptied: users seen for the first
    time."""
    for index, field in enumerate(rows.schema):
        if field.name.startswith("hist_") and pa.types.is_list(field.type):
            empty = pa.array([[]] * rows.num_rows, field.type)
            rows = rows.set_column(index, field, empty)
    return rows


def _export_rank(
    rank: int, world_size: int, run_dir: str, out_dir: str, users_path: str, new_users_path: str
) -> dict[str, Any]:
    """Export, then evaluation's ranking of the users' rows (with and without their history)
    and the item tower's embeddings of the whole corpus (one forward), from the live model."""
    info = export_run(run_dir, out_dir, faiss_index=True)
    model, manifest, config, meta = load_run_model(Path(run_dir))
    env = init_distributed()
    scores, ids = rank_rows(model, manifest, config, env, pq.read_table(users_path), K)
    new_scores, new_ids = rank_rows(model, manifest, config, env, pq.read_table(new_users_path), K)
    names = manifest.schema.side_arrow_schema(Side.ITEM).names
    items = read_split_columns(config.data.path, manifest, "items", names).sort_by(ITEM_ID)
    batch = batch_builder(manifest, config)(items)
    with torch.no_grad():
        item_embeddings = model(batch.user_features, batch.item_features).item
    return {
        "info": info,
        "step": meta["step"],
        "scores": scores,
        "ids": ids,
        "new_user_scores": new_scores,
        "new_user_ids": new_ids,
        "items": item_embeddings,
    }


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp(request.param)
    root = write_tiny_dataset(
        tmp / "data", history_timestamps=True, all_kinds=request.param in ALL_KINDS_VARIANTS
    )
    run_dir, out_dir = tmp / "run", tmp / "export"
    overrides = [*TINY, *VARIANTS[request.param], f"data.path={root}", f"run.dir={run_dir}"]
    steps = run_distributed(_train_rank, 2, overrides)[0]
    users = Manifest.load(root).split_paths(str(root), "test")[0]
    new_users = tmp / "new_users.parquet"
    pq.write_table(without_history(pq.read_table(users)), new_users)
    result = run_distributed(
        _export_rank, 1, str(run_dir), str(out_dir), str(users), str(new_users)
    )[0]
    return {
        **result,
        "steps": steps,
        "run": run_dir,
        "out": out_dir,
        "users": Path(users),
        "new_users": new_users,
    }


def test_retrieve_reproduces_evaluation_topk(exported: dict) -> None:
    table = retrieve(exported["out"], exported["users"], K)
    assert table.num_rows == USERS * K
    ids = table.column(ITEM_ID).to_numpy().reshape(USERS, K)
    scores = table.column("score").to_numpy().reshape(USERS, K)
    assert np.array_equal(ids, exported["ids"].numpy())
    np.testing.assert_array_equal(scores, exported["scores"].numpy())
    assert table.column("row").to_pylist()[::K] == list(range(USERS))
    users = pq.read_table(exported["users"]).column("user_id").to_numpy()
    assert np.array_equal(table.column("user_id").to_numpy()[::K], users)


def test_users_without_history_get_the_evaluation_topk(exported: dict) -> None:
    """Every history bag of the served batch is empty: still the evaluation's ranking."""
    table = retrieve(exported["out"], exported["new_users"], K)
    ids = table.column(ITEM_ID).to_numpy().reshape(USERS, K)
    assert np.array_equal(ids, exported["new_user_ids"].numpy())
    scores = table.column("score").to_numpy().reshape(USERS, K)
    np.testing.assert_array_equal(scores, exported["new_user_scores"].numpy())


def test_item_index_matches_item_tower(exported: dict) -> None:
    out = exported["out"]
    schema = pq.read_schema(out / ITEM_INDEX)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 16)
    ids, embeddings = read_item_index(out / ITEM_INDEX)
    assert ids.tolist() == list(range(ITEMS))
    torch.testing.assert_close(embeddings, exported["items"], rtol=0, atol=1e-6)
    import faiss

    index = faiss.read_index(str(out / FAISS_INDEX))
    assert index.ntotal == ITEMS
    _, faiss_ids = index.search(embeddings[:5].numpy(), 3)
    _, exact_ids = exact_topk(embeddings[:5], embeddings, 3, corpus_ids=ids)
    assert faiss_ids[:, 0].tolist() == exact_ids[:, 0].tolist() == list(range(5))


def test_export_manifest_and_user_program(exported: dict) -> None:
    info = json.loads((exported["out"] / "export.json").read_text())
    assert info == exported["info"]
    assert info["source"]["step"] == exported["step"] == exported["steps"]
    assert info["num_items"] == ITEMS and info["embedding_dim"] == 16
    assert info["user_features"][:3] == ["user_id", "user_segment", "hist_item_ids"]
    model = load_export(exported["out"])
    example = torch.load(exported["out"] / EXAMPLE_INPUT, weights_only=True)
    assert example["lengths"].shape[0] == len(info["user_features"])
    with torch.no_grad():
        users = model.user_program(example["values"], example["lengths"], example["weights"])
    assert users.shape == (example["lengths"].shape[1], 16)
    torch.testing.assert_close(users.norm(dim=1), torch.ones(len(users)))
    # Any batch size: one row alone embeds as it does inside a batch.
    rows = pq.read_table(exported["users"])
    torch.testing.assert_close(embed_users(model, rows.slice(3, 1)), embed_users(model, rows)[3:4])


def test_retrieve_cli_writes_parquet(exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "top.parquet"
    argv = ["retrieve", "--export", str(exported["out"]), "--users", str(exported["users"])]
    assert cli_main([*argv, "--k", "5", "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["row", "user_id", "rank", "item_id", "score"]
    assert table.num_rows == USERS * 5
    assert np.array_equal(
        table.column(ITEM_ID).to_numpy().reshape(USERS, 5), exported["ids"][:, :5].numpy()
    )


def test_users_file_missing_a_column_is_named(exported: dict, tmp_path: Path) -> None:
    users = pq.read_table(exported["users"]).drop_columns(["user_segment"])
    path = tmp_path / "users.parquet"
    pq.write_table(users, path)
    with pytest.raises(SchemaError, match=rf"{path}.*'user_segment'"):
        retrieve(exported["out"], path, K)
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        retrieve(exported["out"], tmp_path / "nowhere.parquet", K)


def test_bad_run_directories_are_named(exported: dict, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        export_run(missing, tmp_path / "out")
    assert cli_main(["export", "--run", str(missing), "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(ConfigError, match="config.yaml"):
        export_run(tmp_path, tmp_path / "out")
    # A run whose only checkpoint was never completed.
    run = tmp_path / "run"
    shutil.copytree(exported["run"], run)
    for marker in (run / "checkpoints").glob("step-*/.complete"):
        marker.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{run / 'checkpoints'}.*no complete"):
        export_run(run, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="export.json"):
        retrieve(tmp_path / "out", exported["users"], K)
