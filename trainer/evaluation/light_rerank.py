"""Inference with the light ranking head: retrieve ``num_knn_items`` by exact sharded MIPS,
rerank them by the head's net user value, keep ``num_items`` (``models/light_ranker.py``).

The head needs each candidate's item embedding; the corpus is sharded over ranks (contiguous
slices from ``embed_corpus``), so every rank all-gathers it once ([N, D]: fine for evaluation
corpora, not meant for serving-scale catalogs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from config import ExperimentConfig
from models.light_ranker import LightRankingHead, rerank
from trainer.mips import ItemLists, distributed_topk


def gather_corpus(
    corpus_ids: torch.Tensor, corpus: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's corpus shard, concatenated in rank order (collective).

    Args:
        corpus_ids: [n_r] int64; corpus: [n_r, D].
    Returns:
        ids [N] int64, embeddings [N, D].
    """
    world_size = dist.get_world_size()
    count = torch.tensor([corpus.shape[0]], dtype=torch.int64, device=corpus.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    rows = max(max(sizes), 1)
    padded = corpus.new_zeros(rows, corpus.shape[1])
    padded[: corpus.shape[0]] = corpus
    padded_ids = corpus_ids.new_full((rows,), -1)
    padded_ids[: corpus_ids.shape[0]] = corpus_ids
    embeddings = [torch.empty_like(padded) for _ in range(world_size)]
    ids = [torch.empty_like(padded_ids) for _ in range(world_size)]
    dist.all_gather(embeddings, padded)
    dist.all_gather(ids, padded_ids)
    return (
        torch.cat([i[:n] for i, n in zip(ids, sizes, strict=True)]),
        torch.cat([e[:n] for e, n in zip(embeddings, sizes, strict=True)]),
    )


def candidate_embeddings(
    candidate_ids: torch.Tensor, all_ids: torch.Tensor, all_items: torch.Tensor
) -> torch.Tensor:
    """candidate_ids [Q, K] (-1 empty) -> embeddings [Q, K, D] (zeros where -1), looked up in
    the gathered corpus (ids [N], embeddings [N, D])."""
    row_of = torch.full(
        (int(all_ids.max()) + 2 if all_ids.numel() else 1,),
        -1,
        dtype=torch.int64,
        device=all_ids.device,
    )
    row_of[all_ids] = torch.arange(all_ids.numel(), device=all_ids.device)
    rows = row_of[candidate_ids]  # id -1 reads the last slot, never an id: row -1
    padded = torch.cat([all_items, all_items.new_zeros(1, all_items.shape[1])])
    return padded[rows]  # row -1 reads the zero row


@torch.no_grad()
def reranked_topk(
    head: LightRankingHead,
    queries: torch.Tensor,
    ranker_queries: torch.Tensor,
    corpus_ids: torch.Tensor,
    corpus: torch.Tensor,
    label_weights: torch.Tensor,
    config: ExperimentConfig,
    exclude: ItemLists | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective. Retrieve ``model.light_head.num_knn_items`` per query by exact MIPS over the
    sharded corpus, rerank by the head's NUV, keep ``model.light_head.num_items``.

    Args:
        queries: [q_r, D] user embeddings; ranker_queries: [q_r, NU, D].
        corpus_ids: [n_r] int64, corpus: [n_r, D] this rank's shard.
        label_weights: [T]; exclude: q_r lists of excluded item ids (or None).
    Returns:
        nuv [q_r, num_items], ids [q_r, num_items] (-1 / -inf for empty slots).
    """
    settings = config.model.light_head
    scores, ids = distributed_topk(
        queries,
        corpus,
        corpus_ids,
        settings.num_knn_items,
        exclude=exclude,
        query_chunk=config.eval.query_chunk,
        corpus_chunk=config.eval.corpus_chunk,
    )
    all_ids, all_items = gather_corpus(corpus_ids, corpus)
    items = candidate_embeddings(ids, all_ids, all_items)
    return rerank(
        head,
        ranker_queries,
        ids,
        scores,
        items,
        label_weights.to(queries.device),
        settings.num_items,
    )


def pad_columns(ids: torch.Tensor, width: int) -> torch.Tensor:
    """ids [Q, k] -> [Q, max(k, width)], new columns -1 (metrics need K >= their cutoffs)."""
    if ids.shape[1] >= width:
        return ids
    return torch.cat([ids, ids.new_full((ids.shape[0], width - ids.shape[1]), -1)], dim=1)
