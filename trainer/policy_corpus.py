"""The item corpus through a retrieval model's item tower, for the jobs that embed it outside
evaluation (alignment's sampled sets and its before/after top-K)."""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from config import ExperimentConfig
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from models.ranker import empty_features
from trainer.build import model_schema
from trainer.features import ResolvedFeatures
from trainer.mips import shard_range
from trainer.runtime.distributed import DistributedEnv


def _item_batches(
    store: ItemFeatureStore, ids: torch.Tensor, calls: int
) -> list[tuple[torch.Tensor, KeyedJaggedTensor]]:
    """``ids`` in ``calls`` pieces (some may be empty: then item 0 of the corpus as a stand-in,
    so that every rank runs the same number of collective forwards)."""
    stand_in = store.corpus_ids()[:1].to(ids.device)
    return [
        (piece, store.lookup(piece if piece.numel() else stand_in))
        for piece in torch.tensor_split(ids, calls)
    ]


@torch.no_grad()
def embed_items(
    model: torch.nn.Module,
    store: ItemFeatureStore,
    ids: torch.Tensor,
    calls: int,
    user_keys: list[str],
) -> torch.Tensor:
    """[n, D] item-tower embeddings of ``ids`` [n], in ``calls`` forwards (the same number on
    every rank when ``model`` is sharded); ``user_keys`` are sent as empty bags."""
    outputs = []
    for piece, items in _item_batches(store, ids, calls):
        embeddings = model(empty_features(user_keys, items), items).item.float()
        outputs.append(embeddings[: piece.numel()])
    return torch.cat(outputs)


def user_keys(
    manifest: Manifest, config: ExperimentConfig, features: ResolvedFeatures | None = None
) -> list[str]:
    """The retrieval model's user-side KJT keys (stored and derived)."""
    return [f.name for f in model_schema(manifest, config, features).user_features()]


def local_corpus(
    model: torch.nn.Module,
    store: ItemFeatureStore,
    keys: list[str],
    batch_size: int,
    env: DistributedEnv,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the corpus: (ids [n_r] int64, embeddings [n_r, D]),
    in batches of ``batch_size``; collective for a sharded model. ``keys``: the model's user
    keys (:func:`user_keys`), sent as empty bags."""
    corpus = store.corpus_ids()
    start, stop = shard_range(len(corpus), env.rank, env.world_size)
    per_rank = -(-len(corpus) // env.world_size)
    calls = max(1, -(-per_rank // batch_size))
    ids = corpus[start:stop].to(env.device)
    return ids, embed_items(model, store, ids, calls, keys)
