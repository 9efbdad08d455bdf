"""The DMP-sharded model (2 gloo ranks, real TorchRec planner) matches an unsharded reference:
same forward outputs, same loss, and the same table and dense updates after one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from config import ShardingType, load_config
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from models.losses import in_batch_softmax_loss, net_user_value
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from trainer.build import (
    batch_builder,
    build_dense_optimizer,
    build_sharded_model,
    build_unsharded_model,
    item_store,
)
from trainer.runtime.distributed import DistributedEnv, seed_everything


def copy_state_dict(sharded: dict, full: dict) -> None:
    """Copy each full tensor of ``full`` into the local shards of ``sharded`` (by offsets)."""
    for name, target in sharded.items():
        source = full[name]
        if not isinstance(target, ShardedTensor):
            target.detach().copy_(source)
            continue
        for shard in target.local_shards():
            rows, cols = shard.metadata.shard_offsets
            height, width = shard.tensor.shape
            shard.tensor.detach().copy_(source[rows : rows + height, cols : cols + width])


def _config(root: str, *extra: str):
    """Small model; SGD tables with a large step so a wrong update shows."""
    return load_config(
        None,
        [
            f"data.path={root}",
            "model.embedding_dim=16",
            "model.user_mlp=[32]",
            "model.item_mlp=[32]",
            "model.output_dim=8",
            "train.sparse_optimizer=sgd",
            "train.sparse_lr=0.5",
            *extra,
        ],
    )


def _batch(root: Path, manifest: Manifest, rows: slice, config):
    units = list_work_units(manifest.split_paths(root, "train"))
    table = read_unit(units[0], None).slice(rows.start, rows.stop - rows.start)
    return batch_builder(manifest, config)(table)


def _step(model, optimizer, batch, weights, temperature):
    optimizer.zero_grad()
    user, item = model(batch.user_features, batch.item_features)[:2]
    loss = in_batch_softmax_loss(
        user, item, batch.item_ids, net_user_value(batch.labels, weights), temperature
    )
    loss.backward()
    optimizer.step()
    return user.detach(), item.detach(), loss.detach()


def _compare_rank(
    rank: int, world_size: int, root: str, sharding_type: str, extra: list[str]
) -> dict:
    root_path = Path(root)
    manifest = Manifest.load(root_path)
    config = _config(root, f"sharding.sharding_types=[{sharding_type}]", *extra)
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    seed_everything(0)
    reference = build_unsharded_model(manifest, config)
    sharded = build_sharded_model(manifest, config, env)
    copy_state_dict(sharded.state_dict(), reference.state_dict())
    weights = torch.tensor([1.0, 0.5])
    # Each rank trains on its own half of the global batch; the reference sees the whole batch
    # and scales per-half losses the way DDP averages gradients.
    local = _batch(root_path, manifest, slice(rank * 16, rank * 16 + 16), config)
    # Extra items (sampled / hard negatives) ride in the same sharded lookup as extra rows.
    extra = item_store(manifest, config).lookup(torch.tensor([3, 7, 3, 59]))
    with torch.no_grad():
        sharded_extra = sharded(local.user_features, local.item_features, extra).extra_items
        reference_extra = reference(local.user_features, local.item_features, extra).extra_items
    extra_close = torch.allclose(sharded_extra, reference_extra, atol=1e-5)
    user, item, loss = _step(
        sharded, build_dense_optimizer(sharded, config), local, weights, config.model.temperature
    )
    ref_user, ref_item = reference(local.user_features, local.item_features)[:2]
    forward_close = (
        torch.allclose(user, ref_user, atol=1e-5)
        and torch.allclose(item, ref_item, atol=1e-5)
        and extra_close
    )
    plan_types = {p.sharding_type for plan in sharded.plan.plan.values() for p in plan.values()}
    return {
        "forward_close": forward_close,
        "loss": float(loss),
        "plan_types": sorted(plan_types),
        "state": {
            k: (v.local_shards()[0].tensor.clone(), v.local_shards()[0].metadata.shard_offsets)
            if isinstance(v, ShardedTensor) and v.local_shards()
            else v.clone()
            for k, v in sharded.state_dict().items()
            if not isinstance(v, ShardedTensor) or v.local_shards()
        },
        "reference_initial": {k: v.clone() for k, v in reference.state_dict().items()},
    }


def _reference_step(root: str, initial: dict, extra: list[str]) -> dict:
    """Unsharded model, one step over both halves with DDP-style gradient averaging."""
    manifest = Manifest.load(Path(root))
    config = _config(root, *extra)
    model = build_unsharded_model(manifest, config)
    model.load_state_dict(initial)
    weights = torch.tensor([1.0, 0.5])
    tables = ("sparse_arch", "weighted_arch", "sequence_arch")
    dense = [p for n, p in model.named_parameters() if not n.startswith(tables)]
    optimizer = torch.optim.AdamW(dense, lr=config.train.dense_lr)
    table_optimizer = torch.optim.SGD(
        [p for n, p in model.named_parameters() if n.startswith(tables)], lr=0.5
    )
    total = 0.0
    for rank in range(2):
        batch = _batch(Path(root), manifest, slice(rank * 16, rank * 16 + 16), config)
        user, item = model(batch.user_features, batch.item_features)[:2]
        loss = in_batch_softmax_loss(
            user,
            item,
            batch.item_ids,
            net_user_value(batch.labels, weights),
            config.model.temperature,
        )
        (loss / 2).backward()  # DDP averages dense gradients over 2 ranks
        total += float(loss)
    # TorchRec divides sharded-table gradients by the world size (gradient division is on by
    # default), so tables and DDP dense layers both see the mean over ranks: loss / 2 above.
    optimizer.step()
    table_optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Feature settings of the all-kinds cases: affinity table 8 wide, the counter's bucket table 4
# wide; text and search tokens (one shared table) summed with raw idf weights ("sum") or as an
# idf-weighted mean ("mean", weights normalized per row before the summing table).
ALL_KINDS_CONFIG = [
    "features.columns.user_topic_affinity.dim=8",
    "features.columns.item_view_count_1h.dim=4",
]
SUM_POOLED_TEXT = [
    "features.columns.search_query_tokens.pooling=sum",
    "features.columns.item_text_tokens.pooling=sum",
]

# The history encoder: item_id moves to an EmbeddingCollection shared with the history.
HISTORY = [
    "model.history.enabled=true",
    "model.history.encoder=self_attention",
    "model.history.combiner=gated",
    "model.history.recency_buckets=4",
    "model.history.dropout=0.0",
]


@pytest.mark.parametrize(
    ("sharding_type", "history", "all_kinds"),
    [
        (ShardingType.TABLE_WISE, False, False),
        (ShardingType.COLUMN_WISE, False, False),
        (ShardingType.TABLE_WISE, True, False),
        (ShardingType.COLUMN_WISE, True, False),
        # Every feature kind: weighted text (idf, mean-pooled through a weighted table)
        # shared with weighted search tokens, a counter (bucket embedding + dense input),
        # context, weighted affinities; one table declared with its own settings.
        (ShardingType.TABLE_WISE, False, "sum"),
        (ShardingType.COLUMN_WISE, True, "mean"),
    ],
)
def test_sharded_matches_unsharded(
    tmp_path: Path, sharding_type: ShardingType, history: bool, all_kinds: str | bool
) -> None:
    root = write_tiny_dataset(
        tmp_path / "data", history_timestamps=history, all_kinds=bool(all_kinds)
    )
    extra = HISTORY if history else []
    if all_kinds:
        extra = [*extra, *ALL_KINDS_CONFIG, *(SUM_POOLED_TEXT if all_kinds == "sum" else [])]
    results = run_distributed(_compare_rank, 2, str(root), sharding_type.value, extra)
    assert all(r["forward_close"] for r in results)
    assert all(r["plan_types"] == [sharding_type.value] for r in results)
    expected = _reference_step(str(root), results[0]["reference_initial"], extra)
    for result in results:
        for name, value in result["state"].items():
            if isinstance(value, tuple):
                shard, offsets = value
                rows = slice(offsets[0], offsets[0] + shard.shape[0])
                cols = slice(offsets[1], offsets[1] + shard.shape[1])
                torch.testing.assert_close(
                    shard, expected[name][rows, cols], atol=1e-5, rtol=1e-4, msg=name
                )
            else:
                torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=name)
