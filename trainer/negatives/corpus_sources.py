"""Candidates drawn from the item corpus: the corpus sampler of mixed negatives, and the whole
corpus as the shared candidates (``loss.candidates=corpus``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec import KeyedJaggedTensor

from config import CorpusDistribution, ExperimentConfig
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from data_pipeline.negatives import CorpusSampler, item_counts


@dataclass(frozen=True)
class CorpusCandidates:
    """Every corpus item as the shared candidates (``loss.candidates=corpus``).

    Args:
        ids: [C] int64 corpus ids, ascending.
        features: their item features (stride C), looked up once.
        column_of: [num_items] int64 column of each id in ``ids`` (-1: not in the corpus).
    """

    ids: torch.Tensor
    features: KeyedJaggedTensor
    column_of: torch.Tensor

    @staticmethod
    def build(store: ItemFeatureStore, device: torch.device) -> CorpusCandidates:
        ids = store.corpus_ids()
        column_of = torch.full((store.num_items,), -1, dtype=torch.int64)
        column_of[ids] = torch.arange(ids.shape[0])
        return CorpusCandidates(ids.to(device), store.lookup(ids).to(device), column_of.to(device))

    def columns(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[B] column of each positive id; ValueError naming ids outside the corpus."""
        columns = self.column_of[item_ids]
        if bool((columns < 0).any()):
            missing = item_ids[columns < 0].unique()[:5].tolist()
            raise ValueError(
                f"loss.candidates=corpus: positive item ids {missing} have no row in items/"
            )
        return columns


def corpus_sampler(
    config: ExperimentConfig, manifest: Manifest, store: ItemFeatureStore
) -> CorpusSampler | None:
    mixed = config.negatives.mixed
    if mixed.num_samples == 0:
        return None
    corpus = store.corpus_ids()
    if mixed.distribution is CorpusDistribution.UNIFORM:
        return CorpusSampler.uniform(corpus)
    paths = manifest.split_paths(config.data.path, config.data.train_split)
    counts = item_counts(paths, manifest.tables["item_id"])
    return CorpusSampler.unigram(corpus, torch.from_numpy(counts[corpus.numpy()]), mixed.alpha)
