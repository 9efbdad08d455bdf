"""``twotower export --run RUN --out DIR``: a trained run's item index and user tower for serving.

The run's latest complete checkpoint is loaded into the unsharded model in one process (a
distributed run of size 1; DCP reshards whatever world size saved it). The export folder holds:

- ``items.parquet``: ``item_id`` int64 and ``embedding`` fixed_size_list<float32>[D] for the whole
  item corpus in id order, computed by ``trainer.evaluation.evaluate.embed_corpus`` (what evaluation ranks).
- ``items.faiss`` (``--faiss``): the same vectors in a faiss ``IndexFlatIP`` wrapped in an
  ``IndexIDMap`` (searches return item ids).
- ``user_tower.pt2``: the user tower as a ``torch.export`` program. TorchRec's KeyedJaggedTensor
  is built inside it, so it takes plain tensors: ``values`` [sum(lengths)] int64 ids of every
  user feature in ``user_features`` order, ``lengths`` [F, B] int64 and ``weights``
  [sum(lengths)] float32 (per-id weights and dense counter values; ones for plain ids); it
  returns [B, D] float32.
- ``example_input.pt``: {"values", "lengths", "weights"} for that program
  (``torch.load(weights_only=True)``).
- ``export.json``: feature names, dims, normalization, temperature, item count, source step.
- ``config.yaml`` and ``dataset/manifest.json``: what ``twotower retrieve`` needs to build user
  features from raw rows the way the data pipeline does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from config import ConfigError, ExperimentConfig, load_config, to_yaml
from data_pipeline.batch import BatchBuilder
from data_pipeline.manifest import Manifest
from data_pipeline.raw_ids import copy_raw_ids
from data_pipeline.schema import ITEM_ID
from models.two_tower import TwoTowerModel
from trainer.build import batch_builder, build_unsharded_model
from trainer.evaluation.corpus import embed_corpus
from trainer.features import resolve_features
from trainer.runtime.checkpoint import best_checkpoint, latest_checkpoint, load_model
from trainer.runtime.distributed import init_distributed
from trainer.runtime.run_files import CONFIG_FILE

logger = logging.getLogger(__name__)

EXPORT_MANIFEST = "export.json"
ITEM_INDEX = "items.parquet"
FAISS_INDEX = "items.faiss"
USER_PROGRAM = "user_tower.pt2"
EXAMPLE_INPUT = "example_input.pt"
EMBEDDING = "embedding"
FORMAT_VERSION = 1
# Rows of the example input: at least 2, so torch.export does not specialize the batch to 1.
EXAMPLE_ROWS = 8


class UserTowerProgram(nn.Module):
    """The user tower over plain tensors (what ``torch.export`` captures).

    Args:
        model: the trained two-tower model (unsharded, eval mode).
        user_keys: the F user feature names, in the order of ``lengths``' rows.
    """

    def __init__(self, model: TwoTowerModel, user_keys: list[str]) -> None:
        super().__init__()
        self.model = model
        self.user_keys = list(user_keys)

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """values: [sum(lengths)] int64, feature-major; lengths: [F, B] int64; weights:
        [sum(lengths)] float32. Returns [B, D]."""
        features = KeyedJaggedTensor(
            keys=self.user_keys, values=values, lengths=lengths.reshape(-1), weights=weights
        )
        return self.model.user_embeddings(features)


ProgramInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def program_inputs(user_features: KeyedJaggedTensor) -> ProgramInputs:
    """A user KJT (F keys, stride B) as the program's (values [N], lengths [F, B], weights [N]);
    weights are ones where the KJT has none."""
    keys = user_features.keys()
    lengths = user_features.lengths().to(torch.int64).reshape(len(keys), -1)
    values = user_features.values().to(torch.int64)
    weights = user_features.weights_or_none()
    if weights is None:
        weights = torch.ones(values.shape, dtype=torch.float32, device=values.device)
    return values, lengths, weights.to(torch.float32)


def export_user_program(
    model: TwoTowerModel, user_keys: list[str], example: ProgramInputs
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``UserTowerProgram`` with a dynamic batch and value count.

    Args:
        example: (values [N], lengths [F, B], weights [N]) with B >= 2.
    """
    batch = torch.export.Dim("batch", min=1)
    values = torch.export.Dim("values", min=0)
    program = UserTowerProgram(model, user_keys).eval()
    with torch.no_grad():
        return torch.export.export(
            program,
            example,
            dynamic_shapes=({0: values}, {1: batch}, {0: values}),
            strict=False,
        )


def write_item_index(ids: torch.Tensor, embeddings: torch.Tensor, path: Path) -> None:
    """Parquet of ``item_id`` (ids [N] int64) and ``embedding`` (embeddings [N, D] float32)."""
    dim = embeddings.shape[1]
    flat = pa.array(embeddings.float().contiguous().numpy().reshape(-1), pa.float32())
    table = pa.table(
        {
            ITEM_ID: pa.array(ids.numpy().astype(np.int64)),
            EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    pq.write_table(table, path)


def read_item_index(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``write_item_index``'s file back as (ids [N] int64, embeddings [N, D] float32)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no item index (run `twotower export` first)")
    table = pq.read_table(path)
    missing = [c for c in (ITEM_ID, EMBEDDING) if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: item index lacks column(s) {missing}")
    column = table.column(EMBEDDING).combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    ids = table.column(ITEM_ID).to_numpy().astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(flat.reshape(len(ids), dim).copy())


def write_faiss_index(ids: torch.Tensor, embeddings: torch.Tensor, path: Path) -> None:
    """Exact inner-product faiss index of embeddings [N, D] float32 under item ids [N] int64."""
    import faiss  # optional: only ``--faiss`` needs it

    index = faiss.IndexIDMap(faiss.IndexFlatIP(embeddings.shape[1]))
    index.add_with_ids(
        np.ascontiguousarray(embeddings.float().numpy()), ids.numpy().astype(np.int64)
    )
    faiss.write_index(index, str(path))


def run_checkpoint(
    run_dir: Path, overrides: list[str] | None = None
) -> tuple[ExperimentConfig, Path]:
    """The run's config and its best validation checkpoint, else its latest complete one;
    errors name the missing path."""
    config_path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not config_path.exists():
        raise ConfigError(f"{config_path}: not a run directory (no config.yaml)")
    config = load_config(config_path, overrides or [])
    checkpoint = best_checkpoint(run_dir) or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{run_dir / 'checkpoints'}: no complete checkpoint (step-N with .complete) to export"
        )
    return config, checkpoint


def example_rows(manifest: Manifest, config: ExperimentConfig) -> pa.Table:
    """The first ``EXAMPLE_ROWS`` events of the evaluation split (repeated if fewer than 2)."""
    path = manifest.split_paths(config.data.path, config.eval.split)[0]
    table = pq.ParquetFile(path).read_row_group(0).slice(0, EXAMPLE_ROWS)
    return table if table.num_rows >= 2 else pa.concat_tables([table, table, table]).slice(0, 2)


def load_run_model(
    run_dir: Path, overrides: list[str] | None = None
) -> tuple[TwoTowerModel, Manifest, ExperimentConfig, dict[str, Any]]:
    """The run's unsharded model (eval mode) with its latest checkpoint, on this process's
    device; the process group (size 1) is created if needed. Returns the checkpoint meta too."""
    config, checkpoint = run_checkpoint(run_dir, overrides)
    env = init_distributed()
    if env.world_size != 1:
        raise ValueError(f"export runs in one process (world size 1), not {env.world_size}")
    manifest = Manifest.load(config.data.path)
    model = build_unsharded_model(manifest, config, env.device)
    meta = load_model(checkpoint, model)
    logger.info("loaded %s (step %s)", checkpoint, meta.get("step"))
    return model.eval(), manifest, config, {**meta, "checkpoint": str(checkpoint)}


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    faiss_index: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Write the export folder (see the module docstring); returns ``export.json``'s content."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, manifest, config, meta = load_run_model(run_dir, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = init_distributed()
    features = resolve_features(manifest, config)
    item_ids, item_embeddings = embed_corpus(model, manifest, config, env, features)
    item_ids, item_embeddings = item_ids.cpu(), item_embeddings.cpu()
    write_item_index(item_ids, item_embeddings, out_dir / ITEM_INDEX)
    if faiss_index:
        write_faiss_index(item_ids, item_embeddings, out_dir / FAISS_INDEX)
    builder = batch_builder(manifest, config, features)
    user_keys = [f.name for f in builder.schema.user_features()]
    values, lengths, weights = program_inputs(builder.user_features(example_rows(manifest, config)))
    example = (values.to(env.device), lengths.to(env.device), weights.to(env.device))
    torch.export.save(export_user_program(model, user_keys, example), out_dir / USER_PROGRAM)
    torch.save({"values": values, "lengths": lengths, "weights": weights}, out_dir / EXAMPLE_INPUT)
    (out_dir / CONFIG_FILE).write_text(to_yaml(config))
    (out_dir / "dataset").mkdir(exist_ok=True)
    manifest.save(out_dir / "dataset")
    copy_raw_ids(manifest, config.data.path, out_dir / "dataset")
    info = _export_info(model, builder, config, meta, run_dir, len(item_ids), faiss_index)
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps(info, indent=2))
    logger.info(
        "exported %s (step %s, %d items) to %s", run_dir, meta["step"], len(item_ids), out_dir
    )
    return info


def _export_info(
    model: TwoTowerModel,
    builder: BatchBuilder,
    config: ExperimentConfig,
    meta: dict[str, Any],
    run_dir: Path,
    num_items: int,
    faiss_index: bool,
) -> dict[str, Any]:
    """The ``export.json`` manifest."""
    return {
        "format_version": FORMAT_VERSION,
        "source": {"run": str(run_dir), "checkpoint": meta["checkpoint"], "step": meta["step"]},
        "user_features": [f.name for f in builder.schema.user_features()],
        "item_features": [f.name for f in builder.schema.item_features()],
        "embedding_dim": config.model.output_dim,
        "l2_normalize": config.model.l2_normalize,
        "temperature": float(model.temperature().detach()),
        "score": "inner product of user and item embeddings; softmax logits = score / temperature",
        "num_items": num_items,
        "item_index": ITEM_INDEX,
        "faiss_index": FAISS_INDEX if faiss_index else None,
        "user_program": {
            "file": USER_PROGRAM,
            "example_input": EXAMPLE_INPUT,
            "inputs": {
                "values": "[sum(lengths)] int64 ids, feature-major in user_features order",
                "lengths": "[F, B] int64, F = len(user_features)",
                "weights": "[sum(lengths)] float32 per-id weights (ones for plain ids)",
            },
            "output": "[B, embedding_dim] float32",
        },
        "batch_size": config.data.eval_batch_size,
    }
