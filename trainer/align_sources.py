"""What an alignment run starts from and is judged by: the start and reference checkpoints, the
frozen reference model, the ranker as reward model (with the ranker's own item side), and a
synthetic world's ground truth."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

from config import (
    ConfigError,
    ExperimentConfig,
)
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from models.ranker import Ranker, expected_net_user_value
from models.two_tower import TwoTowerModel, select_keys
from trainer.build import (
    build_unsharded_model,
    label_weights,
)
from trainer.evaluation.ground_truth import (
    TruthScorer,
    load_truth_scorer,
)
from trainer.features import ResolvedFeatures
from trainer.ranker_build import load_ranker
from trainer.runtime.checkpoint import load_model, model_checkpoint
from trainer.runtime.distributed import (
    DistributedEnv,
)

logger = logging.getLogger(__name__)


# (user features KJT stride U, item ids [U, K]) -> rewards [U, K]: the reward model's interface.

RewardFn = Callable[[KeyedJaggedTensor, torch.Tensor], torch.Tensor]


class RankerReward:
    """Rewards = the frozen ranker's expected net user value of (user row, item) pairs.

    Args:
        ranker: a frozen ``Ranker`` (``trainer.ranker_build.load_ranker``).
        store: item features by id, for the ranker's item side.
    """

    def __init__(self, ranker: Ranker, store: ItemFeatureStore) -> None:
        self.ranker = ranker
        self.store = store

    @torch.no_grad()
    def __call__(self, user_features: KeyedJaggedTensor, item_ids: torch.Tensor) -> torch.Tensor:
        """``user_features``: KJT with (at least) the ranker's user keys, stride U; ``item_ids``:
        [U, K] corpus ids. Returns [U, K] NUV = sigmoid(ranker logits) . label_weights."""
        missing = sorted(set(self.ranker.user_feature_names) - set(user_features.keys()))
        if missing:
            raise ConfigError(
                f"alignment.reward_checkpoint: the ranker needs user features {missing} that "
                "this run's batches lack (match data.recent_history with the ranker's run)"
            )
        users, per_user = item_ids.shape
        user = self.ranker.user_inputs(select_keys(user_features, self.ranker.user_feature_names))
        item = self.ranker.item_inputs(self.store.lookup(item_ids.reshape(-1)))
        rows = torch.arange(users, device=item_ids.device).repeat_interleave(per_user)
        logits = self.ranker.interact(user[rows], item)
        return expected_net_user_value(logits, self.ranker.label_weights).view(users, per_user)


def alignment_sources(config: ExperimentConfig) -> tuple[Path, Path]:
    """(start, reference) checkpoint folders; errors name the config key."""
    if config.checkpoint.resume_from is None:
        raise ConfigError(
            "config key 'checkpoint.resume_from': alignment starts from a retrieval checkpoint "
            "(a run directory or a step-N folder)"
        )
    try:
        start = model_checkpoint(config.checkpoint.resume_from)
        reference = config.alignment.reference_checkpoint
        return start, start if reference is None else model_checkpoint(reference)
    except FileNotFoundError as error:
        raise ConfigError(f"config key 'checkpoint.resume_from' / 'alignment': {error}") from error


def load_reward_model(
    config: ExperimentConfig, manifest: Manifest, store: ItemFeatureStore
) -> RankerReward:
    """The frozen ranker of ``alignment.reward_checkpoint`` (one replica per rank)."""
    path = config.alignment.reward_checkpoint
    if path is None:
        raise ConfigError(
            "config key 'alignment.reward_checkpoint': name the ranker run to align to"
        )
    try:
        return RankerReward(load_ranker(path, manifest), store)
    except FileNotFoundError as error:
        raise ConfigError(f"config key 'alignment.reward_checkpoint': {error}") from error


def value_weights(
    reward: RewardFn, manifest: Manifest, config: ExperimentConfig
) -> dict[str, float]:
    """Label weights of the value the reward estimates: the ranker run's for a
    ``RankerReward``, else ``loss.label_weights``; ground truth is judged under the same."""
    if isinstance(reward, RankerReward):
        weights = reward.ranker.label_weights.tolist()
        return dict(zip(reward.ranker.labels, weights, strict=True))
    return dict(zip(manifest.schema.labels, label_weights(manifest, config).tolist(), strict=True))


def load_truth(
    config: ExperimentConfig,
    manifest: Manifest,
    store: ItemFeatureStore,
    reward: RewardFn,
    env: DistributedEnv,
) -> TruthScorer | None:
    """The ground-truth scorer of ``data.path`` (None, logged, without truth)."""
    weights = value_weights(reward, manifest, config)
    try:
        return load_truth_scorer(
            config.data.path, manifest, store.corpus_ids(), weights, env.device
        )
    except ValueError as error:
        raise ConfigError(
            f"config key 'loss.label_weights' (or the ranker run's): {error}"
        ) from error


def load_reference(
    manifest: Manifest,
    config: ExperimentConfig,
    path: Path,
    device: torch.device,
    features: ResolvedFeatures | None = None,
) -> TwoTowerModel:
    """A frozen unsharded replica of the retrieval model at ``path`` (a checkpoint folder or a
    run directory's latest; eval mode, no gradients)."""
    reference = build_unsharded_model(manifest, config, device, features)
    load_model(model_checkpoint(path), reference)
    reference.eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference
