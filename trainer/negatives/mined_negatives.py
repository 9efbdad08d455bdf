"""Semi-hard negatives mined from the model's own retrieval (Huang et al. 2020, Facebook EBR).

Every ``refresh_every_steps`` the whole corpus goes through the item tower (each rank embeds
its slice; no gradient). Each step, the batch's users (a no-gradient forward pass of the current
model) retrieve their exact top ``top_k`` from that index with the distributed all-gather
search; the ``skip_top`` best are skipped (likely unlabeled positives) and ``per_row`` items are
drawn uniformly from the rest. The caller embeds them again with gradient as extra items.
"""

from __future__ import annotations

import torch

from config import ExperimentConfig, MinedNegativesConfig
from data_pipeline.batch import Batch
from data_pipeline.manifest import Manifest
from trainer.evaluation.corpus import embed_corpus
from trainer.features import ResolvedFeatures
from trainer.mips import distributed_topk
from trainer.runtime.distributed import DistributedEnv


class CorpusMiner:
    """Args:
    config: the ``negatives.mined`` section.
    features: the job's resolved features (for embedding the corpus; None: resolved there).
    """

    def __init__(
        self, config: MinedNegativesConfig, features: ResolvedFeatures | None = None
    ) -> None:
        self.config = config
        self.features = features
        self.corpus_ids: torch.Tensor | None = None
        self.corpus: torch.Tensor | None = None
        self.refreshed_at: int | None = None

    def refresh_if_due(
        self,
        model: torch.nn.Module,
        manifest: Manifest,
        config: ExperimentConfig,
        env: DistributedEnv,
        step: int,
    ) -> None:
        """Re-embeds this rank's corpus slice when the index is missing or stale (collective)."""
        due = (
            self.refreshed_at is None or step - self.refreshed_at >= self.config.refresh_every_steps
        )
        if not due:
            return
        self.corpus_ids, self.corpus = embed_corpus(model, manifest, config, env, self.features)
        self.refreshed_at = step

    @torch.no_grad()
    def mine(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator
    ) -> torch.Tensor:
        """Returns [B, per_row] int64 mined item ids for the batch's rows (collective)."""
        assert self.corpus is not None and self.corpus_ids is not None, "refresh first"
        users = model(batch.user_features, batch.item_features).user.float()
        _, top = distributed_topk(users, self.corpus, self.corpus_ids, self.config.top_k)
        return sample_band(top, self.config.skip_top, self.config.per_row, generator)


def sample_band(
    ranked: torch.Tensor, skip_top: int, per_row: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``per_row`` distinct ids per row drawn uniformly from ranks ``[skip_top, K)``.

    Args:
        ranked: [B, K] int64 item ids, best first (-1 where fewer than K exist).
        skip_top: how many of the best to skip.
        per_row: how many to draw (<= K - skip_top).
    Returns:
        [B, per_row] int64 (-1 where the band had too few ids).
    """
    band = ranked[:, skip_top:]
    keys = torch.rand(band.shape, generator=generator, device=band.device)
    keys = keys.masked_fill(band < 0, -1.0)
    order = keys.argsort(dim=1, descending=True)[:, :per_row]
    return band.gather(1, order)
