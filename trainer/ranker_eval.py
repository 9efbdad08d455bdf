"""Per-task AUC and log loss of a ranker on an event split (collective over the process group).

Rows are the split's logged pairs plus, with ``ranker.sampled_negatives`` = k > 0, k uniform
corpus items per row with every label 0 (drawn from a fixed seed). ``auc/<label>`` ranks all of
them; ``logged_auc/<label>`` ranks the logged pairs alone (NaN where a label is constant
there, e.g. ``click`` on MovieLens, where every logged row is a click).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.distributed as dist

from config import ExperimentConfig
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from trainer.negatives.negative_sampling import step_generator
from trainer.ranker_build import (
    ranker_first_row_batch,
    ranker_loader_spec,
    with_sampled_negatives,
)
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.synchronized import synchronized

# Seed offset of the evaluation negatives: fixed, and apart from the training draws.
EVAL_SEED_OFFSET = 1_000_003


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    Args:
        scores: [N] float.
        labels: [N] in {0, 1} (values >= 0.5 count as positive).

    Returns:
        AUC in [0, 1]; NaN when only one class is present.
    """
    positive = labels >= 0.5
    count_pos = int(positive.sum())
    count_neg = int(positive.shape[0] - count_pos)
    if count_pos == 0 or count_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.shape[0], dtype=np.float64)
    # Average 1-based rank within each group of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.shape[0]]
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    rank_sum = ranks[positive].sum()
    return float((rank_sum - count_pos * (count_pos + 1) / 2.0) / (count_pos * count_neg))


def binary_log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean BCE of logits [N] against labels [N] in [0, 1]."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits).double(), torch.from_numpy(labels).double()
    )
    return float(loss)


def task_metrics(
    logits: np.ndarray, labels: np.ndarray, logged: np.ndarray, names: tuple[str, ...]
) -> dict[str, float]:
    """Per-task metrics.

    Args:
        logits, labels: [N, T].
        logged: [N] bool, True for logged pairs (False: sampled negatives).
        names: the T label names.
    """
    metrics: dict[str, float] = {"rows": float(logits.shape[0]), "logged_rows": float(logged.sum())}
    for task, name in enumerate(names):
        metrics[f"auc/{name}"] = binary_auc(logits[:, task], labels[:, task])
        metrics[f"log_loss/{name}"] = binary_log_loss(logits[:, task], labels[:, task])
        if not logged.all():
            metrics[f"logged_auc/{name}"] = binary_auc(logits[logged, task], labels[logged, task])
    return metrics


@torch.no_grad()
def evaluate_ranker(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    split: str | None = None,
) -> dict[str, float]:
    """Per-task AUC / log loss over ``split`` (default ``eval.split``); the same dict on every
    rank. ``model`` is a ``Ranker`` or its DMP wrapper; collective."""
    split = split or config.eval.split
    store = (
        ItemFeatureStore.load(config.data.path, manifest)
        if config.ranker.sampled_negatives
        else None
    )
    loader = build_event_loader(
        ranker_loader_spec(config, split, train=False), manifest, env.rank, env.world_size
    )
    was_training = model.training
    model.eval()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    fallback = functools.partial(ranker_first_row_batch, manifest, config, split)
    for index, batch in enumerate(synchronized(loader, env, fallback)):
        generator = step_generator(config.seed + EVAL_SEED_OFFSET, env.rank, index, env.device)
        examples = with_sampled_negatives(batch, store, config.ranker.sampled_negatives, generator)
        logits = model(
            examples.user_features,
            examples.item_features,
            examples.extra_item_features,
            examples.extra_rows,
        )
        live = examples.weights > 0
        logged = torch.zeros_like(live)
        logged[: batch.size] = True
        parts.append((logits[live].cpu(), examples.labels[live].cpu(), logged[live].cpu()))
    model.train(was_training)
    gathered: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] = [
        None
    ] * env.world_size
    dist.all_gather_object(gathered, parts)
    rows = [part for rank_parts in gathered for part in rank_parts or []]
    logits_all = torch.cat([r[0] for r in rows]).double().numpy()
    labels_all = torch.cat([r[1] for r in rows]).double().numpy()
    logged_all = torch.cat([r[2] for r in rows]).numpy()
    return task_metrics(logits_all, labels_all, logged_all, tuple(manifest.schema.labels))


def format_ranker_metrics(metrics: dict[str, float], labels: tuple[str, ...]) -> str:
    """A markdown table: one row per label (AUC, logged-pair AUC, log loss)."""
    lines = ["| label | AUC | logged-pair AUC | log loss |", "|---|---|---|---|"]
    for name in labels:
        logged = metrics.get(f"logged_auc/{name}")
        lines.append(
            f"| {name} | {metrics[f'auc/{name}']:.4f} | "
            f"{'' if logged is None else f'{logged:.4f}'} | {metrics[f'log_loss/{name}']:.4f} |"
        )
    return "\n".join(lines)
