"""Read side of a synthetic world's ground truth (``truth/*.npy``, written by
:func:`data_pipeline.datasets.synthetic.save_truth`) and the world's click model as pure tensor
functions, so a model's choices can be judged by the world instead of by another model.

For user u and item i (:func:`data_pipeline.datasets.synthetic_feed.simulate_feed`), with
affinity ``a = u · v`` and relevance ``r = a + item_bias``, an *examined* impression gives

    P(click)     = sigmoid(r)
    P(like)      = sigmoid(r) · sigmoid(r + like_offset)
    P(long_view) = sigmoid(r) · sigmoid(a + long_view_offset)

and the true expected net user value is ``sum_t w_t P(t)`` for label weights ``w``. Examination
(``1 / (1 + position)^power``) is left out: it is a property of the slot, not of the pair. The
opt-in device effect (``SyntheticFeatures.device_effect``) shifts relevance per session by the
session's device, which the truth files do not pin to a user; :func:`load_synthetic_truth`
reports it so callers can say the truth is the device-free part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.datasets.synthetic_feed import LABELS
from data_pipeline.datasets.synthetic_world import WorldConfig
from data_pipeline.manifest import Manifest, sha256_file

TRUTH_ARRAYS = ("user_factors", "item_factors", "item_bias")


@dataclass(frozen=True)
class SyntheticTruth:
    """The parts of a world's truth that fix the value of a (user, item) pair.

    Args:
        user_factors: [N, d] float64, row = user id.
        item_factors: [M, d] float64, row = item id.
        item_bias: [M] float64.
        like_offset, long_view_offset: the click model's offsets (``WorldConfig``).
        device_effect: > 0 when session devices also shifted relevance (left out here).
    """

    user_factors: torch.Tensor
    item_factors: torch.Tensor
    item_bias: torch.Tensor
    like_offset: float
    long_view_offset: float
    device_effect: float = 0.0

    def to(self, device: torch.device) -> SyntheticTruth:
        return SyntheticTruth(
            self.user_factors.to(device),
            self.item_factors.to(device),
            self.item_bias.to(device),
            self.like_offset,
            self.long_view_offset,
            self.device_effect,
        )


def expected_value(
    truth: SyntheticTruth,
    affinity: torch.Tensor,
    bias: torch.Tensor,
    label_weights: dict[str, float],
) -> torch.Tensor:
    """True expected NUV of examined impressions (module docstring).

    Args:
        affinity: [...] u · v of each pair.
        bias: [...] (or broadcastable) item bias of each pair's item.
        label_weights: label name (``click``, ``like``, ``long_view``) -> weight.

    Returns:
        [...] float64 ``sum_t w_t P(t)``.
    """
    unknown = sorted(set(label_weights) - set(LABELS))
    if unknown:
        raise ValueError(f"label weights {unknown}: the synthetic world has labels {LABELS}")
    relevance = affinity.double() + bias.double()
    click = torch.sigmoid(relevance)
    probabilities = {
        "click": click,
        "like": click * torch.sigmoid(relevance + truth.like_offset),
        "long_view": click * torch.sigmoid(affinity.double() + truth.long_view_offset),
    }
    value = torch.zeros_like(click)
    for label, weight in label_weights.items():
        value = value + weight * probabilities[label]
    return value


def pair_values(
    truth: SyntheticTruth,
    users: torch.Tensor,
    items: torch.Tensor,
    label_weights: dict[str, float],
) -> torch.Tensor:
    """[U, K] true expected NUV of ``users`` [U] (ids) with their ``items`` [U, K] (ids)."""
    affinity = torch.einsum("ud,ukd->uk", truth.user_factors[users], truth.item_factors[items])
    return expected_value(truth, affinity, truth.item_bias[items], label_weights)


def corpus_values(
    truth: SyntheticTruth,
    users: torch.Tensor,
    corpus_ids: torch.Tensor,
    label_weights: dict[str, float],
) -> torch.Tensor:
    """[U, n] true expected NUV of ``users`` [U] with every item of ``corpus_ids`` [n]."""
    affinity = truth.user_factors[users] @ truth.item_factors[corpus_ids].T
    return expected_value(truth, affinity, truth.item_bias[corpus_ids], label_weights)


def _load_array(root: Path, name: str, info: dict[str, str]) -> np.ndarray:
    path = root / info["path"]
    if not path.exists():
        raise FileNotFoundError(f"{path}: ground-truth array {name!r} of the manifest is missing")
    if sha256_file(path) != info["sha256"]:
        raise ValueError(
            f"{path}: sha256 does not match manifest extra['truth'][{name!r}] (file changed)"
        )
    return np.load(path, allow_pickle=False)


def load_synthetic_truth(root: Path | str, manifest: Manifest) -> SyntheticTruth | None:
    """The truth of the dataset at ``root``; None when its manifest records none (every
    dataset but the synthetic world). Arrays are checked against the manifest's sha256."""
    extra: dict[str, Any] = manifest.extra if isinstance(manifest.extra, dict) else {}
    files = extra.get("truth")
    if not files or not set(TRUTH_ARRAYS) <= set(files):
        return None
    arrays = {name: _load_array(Path(root), name, files[name]) for name in TRUTH_ARRAYS}
    generator = extra.get("generator", {})
    defaults = WorldConfig()
    features = generator.get("features", {})
    return SyntheticTruth(
        user_factors=torch.from_numpy(arrays["user_factors"]).double(),
        item_factors=torch.from_numpy(arrays["item_factors"]).double(),
        item_bias=torch.from_numpy(arrays["item_bias"]).double(),
        like_offset=float(generator.get("like_offset", defaults.like_offset)),
        long_view_offset=float(generator.get("long_view_offset", defaults.long_view_offset)),
        device_effect=float(features.get("device_effect", 0.0)),
    )
