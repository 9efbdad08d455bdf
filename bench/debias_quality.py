"""Do debiased example weights rank items by true relevance better than raw net user value?

    python -m bench.debias_quality --data data/synthetic-debias --runs runs/dq-default

On a small synthetic world (``--events`` impressions; prepared into ``--data`` if missing), one
run per ``--modes`` entry trains with both debias heads on (``configs/synthetic.yaml`` plus
``--epochs`` and the position head's ``--position-lr-scale``), through the real launcher. Its
trained heads then weight every training row:

- ``raw NUV``: ``labels · label_weights``;
- ``position``: NUV with the position estimate removed;
- ``position + user``: that weight with the user estimate removed (what the trainer used);
- ``position, E[NUV | slot]``: NUV with the observed mean NUV of its slot removed (same mode and
  clamps): what the position head converges to, so it separates the estimator's design from its
  training;
- ``oracle IPS``: NUV divided by the world's true examination ``1 / (1 + position)^power``, the
  best any position correction can do.

Against the world's ground truth (``relevance = u · v + item_bias``, ``truth/*.npy``), over items
with at least ``--min-impressions`` training impressions, each scored by its mean weight:

- item tau (audience): Kendall tau against the mean of ``sigmoid(relevance)`` over the same
  impressions (click probability if examined, for the users it was shown to), so only the
  slot it was shown in separates weight from truth; NDCG@50 with those gains;
- item tau (population): against ``mean_u sigmoid(u · v_i + b_i)`` over all users;
- row tau (clicked): each clicked row's weight against its own relevance;
- session NDCG: each training session's P shown items re-ordered by their item score (mean
  weight, ties broken at random) against the session user's ``sigmoid(relevance)``, averaged over
  sessions: do the item scores put this user's relevant items first (the logged order's and a
  random order's session NDCG are printed for scale).

``--ranker-noise`` sets the logging ranker's noise (``WorldConfig.ranker_noise_std``): the larger,
the less the slot an item gets depends on its relevance. ``--promotion-std`` adds a per-item
promotion boost, unrelated to relevance, to the logging ranker's ordering, and
``--shuffled-fraction`` shows that share of sessions in random order: placement then depends on
something other than relevance, the case position debiasing is for.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from bench.table import print_table
from config import DebiasConfig, DebiasMode
from data_pipeline.datasets.synthetic import prepare_synthetic
from data_pipeline.datasets.synthetic_world import WorldConfig
from data_pipeline.manifest import Manifest
from data_pipeline.split_table import read_split_columns
from launch.local import torchrun_command
from models.debias import remove_estimate
from models.losses import net_user_value
from trainer.build import batch_builder, label_weights
from trainer.runtime.run_files import CHECKPOINTS_DIR
from trainer.serving.export import load_run_model

COLUMNS = (
    "weights",
    "mode",
    "item tau (audience)",
    "item NDCG@50 (audience)",
    "item tau (population)",
    "row tau (clicked)",
    "session NDCG",
)


def prepare(data: Path, args: argparse.Namespace) -> None:
    """A small synthetic world in ``data`` unless one is already there."""
    if (data / "manifest.json").exists():
        return
    world = WorldConfig(
        ranker_noise_std=args.ranker_noise,
        promotion_std=args.promotion_std,
        shuffled_fraction=args.shuffled_fraction,
    )
    prepare_synthetic(args.users, args.items, args.events, args.seed, data, world=world)


def train_run(config: str, data: Path, run_dir: Path, mode: str, args: argparse.Namespace) -> None:
    """One training run with both debias parts on in ``mode`` (1 rank, real launcher)."""
    if (run_dir / CHECKPOINTS_DIR).exists():
        return
    overrides = [
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"train.epochs={args.epochs}",
        "eval.at_end=false",
        "logging.wandb=false",
        "train.progress_bar=false",
        "model.debias.position.enabled=true",
        "model.debias.user.enabled=true",
        f"model.debias.position.mode={mode}",
        f"model.debias.user.mode={mode}",
        f"model.debias.position.learning_rate_scale={args.position_lr_scale}",
    ]
    subprocess.run(torchrun_command(1, config, overrides), check=True)


@torch.no_grad()
def row_estimates(run_dir: Path, chunk: int = 8192) -> tuple[dict[str, np.ndarray], DebiasConfig]:
    """Every training row's user, item, NUV and the trained heads' estimates ([R] each), and
    the run's debias configuration."""
    model, manifest, config, _ = load_run_model(run_dir)
    assert model.debias is not None, f"{run_dir}: debias heads are off"
    builder = batch_builder(manifest, config)
    table = read_split_columns(
        config.data.path, manifest, "train", manifest.schema.event_arrow_schema().names
    )
    weights = label_weights(manifest, config)
    keys = ("user", "item", "position", "nuv", "pos", "usr")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, table.num_rows, chunk):
        batch = builder(table.slice(start, chunk))
        outputs = model(batch.user_features, batch.item_features, None, batch.position)
        assert outputs.debias.position is not None and outputs.debias.user is not None
        parts["user"].append(batch.user_ids.numpy())
        parts["item"].append(batch.item_ids.numpy())
        parts["position"].append(batch.position.numpy())
        parts["nuv"].append(net_user_value(batch.labels, weights).numpy())
        parts["pos"].append(outputs.debias.position.numpy())
        parts["usr"].append(outputs.debias.user.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}, config.model.debias


def slot_means(rows: dict[str, np.ndarray], buckets: int) -> np.ndarray:
    """[R] the observed mean NUV of each row's position bucket (the MSE-optimal position head)."""
    bucket = np.clip(rows["position"], 0, buckets - 1)
    sums = np.bincount(bucket, weights=rows["nuv"], minlength=buckets)
    return (sums / np.maximum(np.bincount(bucket, minlength=buckets), 1))[bucket]


def converged_variants(rows: dict, config: DebiasConfig) -> dict[DebiasMode, np.ndarray]:
    """NUV [R] with the converged position estimate (observed mean NUV per slot) removed, in
    each mode, with the run's clamps."""
    position = config.position
    estimate = torch.from_numpy(slot_means(rows, position.buckets))
    nuv = torch.from_numpy(rows["nuv"])
    return {
        mode: remove_estimate(
            nuv, estimate, mode, position.min_estimate, position.max_weight
        ).numpy()
        for mode in DebiasMode
    }


def weight_variants(rows: dict, config: DebiasConfig) -> dict[str, np.ndarray]:
    """raw / position / position + user weights [R], as the trainer computes them."""
    nuv = torch.from_numpy(rows["nuv"])
    position, user = config.position, config.user
    after_position = remove_estimate(
        nuv,
        torch.from_numpy(rows["pos"]),
        position.mode,
        position.min_estimate,
        position.max_weight,
    )
    both = remove_estimate(
        after_position, torch.from_numpy(rows["usr"]), user.mode, user.min_estimate, user.max_weight
    )
    return {
        "raw NUV": rows["nuv"],
        "position": after_position.numpy(),
        "position + user": both.numpy(),
    }


def true_relevance(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user factors [N, d], item factors [M, d], item bias [M]) of the synthetic world."""
    truth = data / "truth"
    return (
        np.load(truth / "user_factors.npy"),
        np.load(truth / "item_factors.npy"),
        np.load(truth / "item_bias.npy"),
    )


def population_quality(users: np.ndarray, items: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """q [M]: mean over users of sigmoid(u · v_i + b_i)."""
    logits = users @ items.T + bias
    return (1.0 / (1.0 + np.exp(-logits))).mean(axis=0)


def ndcg_at(scores: np.ndarray, gains: np.ndarray, k: int) -> float:
    """NDCG@k of ranking by ``scores`` [M] with ``gains`` [M] >= 0."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    top = np.argsort(-scores, kind="stable")[:k]
    ideal = np.sort(gains)[::-1][:k]
    return float((gains[top] * discount[: len(top)]).sum() / (ideal * discount[: len(ideal)]).sum())


def item_means(item: np.ndarray, weight: np.ndarray, items: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean weight per item [M], impressions per item [M])."""
    counts = np.bincount(item, minlength=items)
    sums = np.bincount(item, weights=weight, minlength=items)
    return sums / np.maximum(counts, 1), counts


def examination(data: Path, position: np.ndarray) -> np.ndarray:
    """[R] the world's true examination probability of each row's slot."""
    power = Manifest.load(data).extra["generator"]["examination_power"]
    return (1.0 + position.astype(np.float64)) ** -power


def session_ndcg(row_score: np.ndarray, gains: np.ndarray, position: np.ndarray) -> float:
    """Mean over sessions of NDCG@P of the shown items ordered by ``row_score`` [R] (ties at
    random, the same draw for every variant) against ``gains`` [R]; rows are whole sessions in
    (session, position) order, as the train split is written (``position`` [R] checks it)."""
    slots = int(position.max()) + 1
    assert len(gains) % slots == 0 and (position[::slots] == 0).all()
    score, gains = row_score.reshape(-1, slots), gains.reshape(-1, slots)
    tie_break = np.random.default_rng(0).random(score.shape)
    order = np.lexsort((tie_break, -score), axis=1)
    discount = 1.0 / np.log2(np.arange(2, slots + 2))
    dcg = (np.take_along_axis(gains, order, axis=1) * discount).sum(axis=1)
    ideal = (-np.sort(-gains, axis=1) * discount).sum(axis=1)
    return float((dcg / ideal).mean())


def score_weights(
    rows: dict[str, np.ndarray], weight: np.ndarray, truth: tuple, min_impressions: int
) -> dict[str, float]:
    """The table's metric columns for one weight variant [R]."""
    users, items, bias = truth
    relevance = np.einsum("rd,rd->r", users[rows["user"]], items[rows["item"]]) + bias[rows["item"]]
    click_probability = 1.0 / (1.0 + np.exp(-relevance))
    audience, counts = item_means(rows["item"], click_probability, len(bias))
    population = population_quality(users, items, bias)
    means, _ = item_means(rows["item"], weight, len(bias))
    kept = counts >= min_impressions
    clicked = rows["nuv"] > 0
    return {
        "item tau (audience)": float(kendalltau(means[kept], audience[kept]).statistic),
        "item NDCG@50 (audience)": ndcg_at(means[kept], audience[kept], 50),
        "item tau (population)": float(kendalltau(means[kept], population[kept]).statistic),
        "row tau (clicked)": float(kendalltau(weight[clicked], relevance[clicked]).statistic),
        "session NDCG": session_ndcg(means[rows["item"]], click_probability, rows["position"]),
    }


def quality_table(args: argparse.Namespace) -> list[dict[str, str]]:
    """Train one run per mode, then score every weight variant (raw, oracle and the converged
    position estimate once)."""
    truth = true_relevance(args.data)
    table: list[dict[str, str]] = []
    for mode in args.modes:
        run_dir = args.runs / mode
        train_run(args.config, args.data, run_dir, mode, args)
        rows, debias = row_estimates(run_dir)
        variants = {(name, mode): w for name, w in weight_variants(rows, debias).items()}
        if not table:
            oracle = rows["nuv"] / examination(args.data, rows["position"])
            variants = {("raw NUV", "-"): rows["nuv"], ("oracle IPS", "-"): oracle} | variants
            for converged_mode, weight in converged_variants(rows, debias).items():
                variants["position, E[NUV | slot]", converged_mode.value] = weight
        for (name, name_mode), weight in variants.items():
            if name == "raw NUV" and name_mode != "-":
                continue
            scores = score_weights(rows, weight, truth, args.min_impressions)
            cells = {k: f"{v:.4f}" for k, v in scores.items()}
            table.append({"weights": name, "mode": name_mode, **cells})
    kept = item_means(rows["item"], rows["nuv"], len(truth[2]))[1] >= args.min_impressions
    print(
        f"{int(kept.sum())} items with >= {args.min_impressions} impressions, "
        f"{int((rows['nuv'] > 0).sum())} clicked rows of {len(rows['nuv'])}"
    )
    users, items, bias = truth
    relevance = np.einsum("rd,rd->r", users[rows["user"]], items[rows["item"]]) + bias[rows["item"]]
    gains = 1.0 / (1.0 + np.exp(-relevance))
    logged = session_ndcg(-rows["position"].astype(np.float64), gains, rows["position"])
    random_order = session_ndcg(np.zeros(len(gains)), gains, rows["position"])
    print(f"session NDCG of the logged order {logged:.4f}, of a random order {random_order:.4f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/synthetic-debias"))
    parser.add_argument("--runs", type=Path, default=Path("runs/debias-quality"))
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranker-noise", type=float, default=1.0)
    parser.add_argument("--promotion-std", type=float, default=0.0)
    parser.add_argument("--shuffled-fraction", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--position-lr-scale", type=float, default=10.0)
    parser.add_argument("--modes", nargs="+", default=["divide", "subtract"])
    parser.add_argument("--min-impressions", type=int, default=100)
    args = parser.parse_args()
    prepare(args.data, args)
    print_table(quality_table(args), COLUMNS)


if __name__ == "__main__":
    main()
