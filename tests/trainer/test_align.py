"""The alignment phase end to end on the tiny dataset: with a reward whose answer is known it
raises the policy's expected reward (top-K and corpus softmax), a larger KL coefficient keeps the
policy nearer the reference, a trained ranker works as the reward model through the CLI and its
reward of the top-K rises by more than its standard error (and ``twotower eval --run``
evaluates the aligned run), 2 gloo ranks agree, config mistakes name their key. On a tiny
synthetic world: the ground truth of a top-K against a brute-force loop over every item, the
truth's click model against the simulated feed, and ``align`` reporting the truth beside the
reward (a reward that is the truth raises both; one that inverts it shows as reward hacking)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import KeyedJaggedTensor

from config import ConfigError, ExperimentConfig, load_config
from data_pipeline.datasets.synthetic import prepare_synthetic
from data_pipeline.datasets.synthetic_features import SyntheticFeatures
from data_pipeline.datasets.synthetic_truth import (
    SyntheticTruth,
    load_synthetic_truth,
    pair_values,
)
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from launch.cli import main as cli_main
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from trainer.align import (
    align,
    alignment_sources,
    load_reference,
    sample_candidates,
)
from trainer.build import loader_spec
from trainer.evaluation.ground_truth import TruthScorer, paired_summary, top_k_truth
from trainer.policy_corpus import embed_items, user_keys
from trainer.runtime.distributed import shutdown
from trainer.runtime.run_files import ALIGN_SUMMARY_FILE

GROUPS = 5
MODEL = [
    "model.embedding_dim=16",
    "model.user_mlp=[32]",
    "model.item_mlp=[32]",
    "model.output_dim=16",
    "model.temperature=0.2",
    "data.num_workers=0",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "train.progress_bar=false",
    "train.log_every_steps=5",
    "ranker.train.progress_bar=false",
    "alignment.train.progress_bar=false",
    "alignment.train.log_every_steps=5",
    "logging.wandb=false",
    "eval.at_end=false",
]


class KnownReward:
    """User u values exactly the items i with i % 5 == u % 5 (reward 1, else 0)."""

    def __call__(self, user_features: KeyedJaggedTensor, item_ids: torch.Tensor) -> torch.Tensor:
        users = user_features["user_id"].values()
        return (item_ids % GROUPS == users[:, None] % GROUPS).float()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("alignment.k=1", "alignment.k"),
        ("alignment.top_n=40", "alignment.top_n"),
        ("alignment.kl_coefficient=-1", "alignment.kl_coefficient"),
        ("alignment.method=ppo", "alignment.method"),
        ("alignment.train.max_steps=0", "alignment.train.max_steps"),
        ("alignment.train.dense_lr=0", "alignment.train.dense_lr"),
        ("alignment.exploration=popular", "alignment.exploration"),
        ("alignment.rewardz=x", "alignment.rewardz"),
    ],
)
def test_bad_alignment_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_dpo_needs_a_positive_beta_and_may_have_no_kl_term() -> None:
    with pytest.raises(ConfigError, match="'alignment.dpo_beta'"):
        load_config(None, ["alignment.method=dpo", "alignment.dpo_beta=0"])
    assert load_config(None, ["alignment.method=dpo", "alignment.kl_coefficient=0"])


def test_alignment_needs_a_start_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'checkpoint.resume_from'"):
        alignment_sources(load_config(None, []))
    with pytest.raises(ConfigError, match="checkpoint.resume_from"):
        alignment_sources(load_config(None, [f"checkpoint.resume_from={tmp_path}"]))


def test_sampled_sets_mask_repeats_and_padding_rows() -> None:
    top = torch.tensor([[3, 5], [1, 2], [7, 8]])
    explore = torch.tensor([[5, 9, 9], [4, 1, 6], [0, 1, 2]])
    ids, mask = sample_candidates(top, explore, torch.tensor([True, True, False]))
    assert ids.tolist() == [[3, 5, 5, 9, 9], [1, 2, 4, 1, 6], [7, 8, 0, 1, 2]]
    assert mask.tolist() == [
        [True, True, False, True, False],
        [True, True, True, False, True],
        [False] * 5,
    ]


def _paired(rank: int, world_size: int, before: list[float], after: list[float]) -> tuple:
    from trainer.runtime.distributed import init_distributed

    env = init_distributed()
    rows = torch.tensor_split(torch.arange(len(before)), world_size)[rank]
    values = torch.tensor(before, dtype=torch.float64), torch.tensor(after, dtype=torch.float64)
    return paired_summary(values[0][rows], values[1][rows], env)


@pytest.mark.slow
def test_paired_summary_is_the_standard_error_of_the_differences_over_ranks() -> None:
    generator = np.random.default_rng(0)
    before = generator.random(9)
    after = before + 0.1 + 0.05 * generator.standard_normal(9)
    for mean_before, mean_after, stderr in run_distributed(
        _paired, 2, before.tolist(), after.tolist()
    ):
        assert mean_before == pytest.approx(before.mean())
        assert mean_after == pytest.approx(after.mean())
        assert stderr == pytest.approx((after - before).std(ddof=1) / 3.0)  # sqrt(9 rows)


def _base_run(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny dataset and a briefly trained retrieval run on it."""
    from trainer.train import train

    root = write_tiny_dataset(tmp_path / "data")
    base = tmp_path / "base"
    try:
        train(
            load_config(None, [f"data.path={root}", f"run.dir={base}", "train.max_steps=6", *MODEL])
        )
    finally:
        shutdown()
    return root, base


def _align_config(root: Path, base: Path, run_dir: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"data.path={root}",
            f"run.dir={run_dir}",
            f"checkpoint.resume_from={base}",
            "alignment.k=12",
            "alignment.top_n=4",
            "alignment.train.dense_lr=0.01",
            "alignment.train.sparse_lr=0.1",
            *MODEL,
            *extra,
        ],
    )


def _corpus_softmax_stats(
    config: ExperimentConfig, policy: Path, start: Path
) -> tuple[float, float]:
    """(expected known reward, mean KL to ``start``) of the policy's softmax over the corpus,
    over the test split's users: one unsharded replica of each checkpoint."""
    manifest = Manifest.load(config.data.path)
    store = ItemFeatureStore.load(config.data.path, manifest)
    corpus = store.corpus_ids()
    batch = next(
        iter(build_event_loader(loader_spec(config, "test", False, manifest), manifest, 0, 1))
    )
    log_probs = []
    for path in (policy, start):
        model = load_reference(manifest, config, path, torch.device("cpu"))
        items = embed_items(model, store, corpus, 1, user_keys(manifest, config))
        users = model.user_embeddings(batch.user_features)
        log_probs.append(torch.log_softmax(users @ items.T / model.temperature(), dim=1))
    rewards = KnownReward()(batch.user_features, corpus.expand(batch.size, -1))
    expected = (log_probs[0].exp() * rewards).sum(dim=1).mean()
    kl = (log_probs[0].exp() * (log_probs[0] - log_probs[1])).sum(dim=1).mean()
    return float(expected), float(kl)


@pytest.mark.slow
def test_alignment_raises_the_known_reward_and_kl_holds_it_back(tmp_path: Path) -> None:
    root, base = _base_run(tmp_path)
    results, stats = {}, {}
    try:
        for kl in (0.0, 20.0):
            run_dir = tmp_path / f"aligned_kl{kl}"
            config = _align_config(
                root,
                base,
                run_dir,
                "alignment.train.max_steps=30",
                f"alignment.kl_coefficient={kl}",
            )
            results[kl] = align(config, KnownReward())
            stats[kl] = _corpus_softmax_stats(config, run_dir, base)
    finally:
        shutdown()
    free = results[0.0]
    assert free.steps == 30 and free.checkpoint.endswith("step-30")
    assert free.truth_reward_before is None and free.truth_recall_after is None  # no truth here
    assert free.reward_after > free.reward_before + 0.2, free
    start_reward, _ = _corpus_softmax_stats(_align_config(root, base, tmp_path / "x"), base, base)
    assert stats[0.0][0] > start_reward + 0.1, (start_reward, stats)  # corpus softmax, too
    assert stats[20.0][1] < 0.5 * stats[0.0][1], stats  # KL to the reference
    summary = json.loads((tmp_path / "aligned_kl0.0" / ALIGN_SUMMARY_FILE).read_text())
    assert summary["steps"] == 30 and not [key for key in summary if key.startswith("truth_")]


@pytest.mark.slow
def test_a_trained_ranker_as_reward_model_through_the_cli(tmp_path: Path) -> None:
    from trainer.ranker_train import train_ranker

    root, base = _base_run(tmp_path)
    ranker = tmp_path / "ranker"
    try:
        train_ranker(
            load_config(
                None,
                [
                    f"data.path={root}",
                    f"run.dir={ranker}",
                    "ranker.train.max_steps=6",
                    "ranker.embedding_dim=8",
                    "ranker.mlp=[16]",
                    "ranker.sampled_negatives=1",
                    *MODEL,
                ],
            )
        )
    finally:
        shutdown()
    run_dir = tmp_path / "aligned"
    args = [
        f"data.path={root}",
        f"run.dir={run_dir}",
        f"checkpoint.resume_from={base}",
        f"alignment.reward_checkpoint={ranker}",
        "alignment.k=8",
        "alignment.top_n=3",
        "alignment.method=dpo",
        "alignment.exploration=unigram",
        "checkpoint.every_n_steps=2",
        *MODEL,
    ]
    assert (
        cli_main(["align", "-", *args, "alignment.train.max_steps=3"]) == 2
    )  # no such config file
    base_config = str(base / "config.yaml")  # the usual call: the start run's own config
    assert cli_main(["align", base_config, *args, "alignment.train.max_steps=3"]) == 0
    first = json.loads((run_dir / ALIGN_SUMMARY_FILE).read_text())
    assert (
        cli_main(["align", base_config, *args, "alignment.train.max_steps=5"]) == 0
    )  # resumes at 3
    summary = json.loads((run_dir / ALIGN_SUMMARY_FILE).read_text())
    assert summary["steps"] == 5 and summary["checkpoint"].endswith("step-5")
    # The ranker's reward of the top-K rises by far more than the standard error of the gain
    # over eval rows (3 steps: ~0.0031 at ~0.0003; seeds 0-3 agree to ~0.0002).
    gain = first["reward_after"] - first["reward_before"]
    assert first["reward_gain_stderr"] > 0 and gain > 4 * first["reward_gain_stderr"], first
    # The resumed run starts where the first ended and keeps the gain.
    assert summary["reward_before"] == pytest.approx(first["reward_after"], abs=1e-9)
    assert summary["reward_after"] > first["reward_before"] + 4 * first["reward_gain_stderr"]
    assert not [key for key in summary if key.startswith("truth_")]  # tiny dataset: no truth
    assert cli_main(["eval", "--run", str(run_dir)]) == 0
    assert any(run_dir.glob("eval_*.json")) or (run_dir / "metrics.json").exists()


def _two_ranks(rank: int, world_size: int, root: str, base: str, run_dir: str) -> dict:
    config = _align_config(Path(root), Path(base), Path(run_dir), "alignment.train.max_steps=4")
    result = align(config, KnownReward())
    return {"before": result.reward_before, "after": result.reward_after, "steps": result.steps}


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path: Path) -> None:
    root, base = _base_run(tmp_path)
    results = run_distributed(_two_ranks, 2, str(root), str(base), str(tmp_path / "aligned"))
    assert results[0] == results[1] and results[0]["steps"] == 4
    assert (tmp_path / "aligned" / "checkpoints" / "step-4" / ".complete").exists()


# --- ground truth on a tiny synthetic world ------------------------------------------------------

TRUTH_WEIGHTS = {"click": 1.0, "like": 0.5}
SYNTHETIC = [*MODEL, "loss.label_weights={click: 1.0, like: 0.5}", "eval.split=test"]


@pytest.fixture(scope="module")
def synthetic_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic world (ids and categorical features only)."""
    data = tmp_path_factory.mktemp("synthetic") / "data"
    prepare_synthetic(
        users=60,
        items=120,
        events=6000,
        seed=3,
        out=data,
        history_length=5,
        features=SyntheticFeatures.none(),
        valid_fraction=0.05,
        test_fraction=0.25,
        chunk_events=3000,
    )
    return data


@pytest.fixture(scope="module")
def synthetic_run(synthetic_world: Path) -> dict[str, Path]:
    """The tiny synthetic world and a briefly trained retrieval run on it."""
    from trainer.train import train

    base = synthetic_world.parent / "base"
    args = [f"data.path={synthetic_world}", f"run.dir={base}", "train.max_steps=20"]
    try:
        train(load_config(None, [*args, *SYNTHETIC]))
    finally:
        shutdown()
    return {"data": synthetic_world, "base": base}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _brute_force_values(data: Path, user: int, weights: dict[str, float]) -> list[float]:
    """The world's expected NUV of ``user`` with every item, one pair at a time, from the
    truth files and the feed's click model (``synthetic_feed.simulate_feed``)."""
    from data_pipeline.datasets.synthetic_world import WorldConfig

    users = np.load(data / "truth" / "user_factors.npy").astype(np.float64)
    items = np.load(data / "truth" / "item_factors.npy").astype(np.float64)
    bias = np.load(data / "truth" / "item_bias.npy").astype(np.float64)
    world = WorldConfig()
    values = []
    for item in range(items.shape[0]):
        affinity = float(sum(users[user, d] * items[item, d] for d in range(users.shape[1])))
        relevance = affinity + float(bias[item])
        click = _sigmoid(relevance)
        probability = {
            "click": click,
            "like": click * _sigmoid(relevance + world.like_offset),
            "long_view": click * _sigmoid(affinity + world.long_view_offset),
        }
        values.append(sum(w * probability[label] for label, w in weights.items()))
    return values


def test_ground_truth_of_a_top_k_matches_a_brute_force_loop(synthetic_world: Path) -> None:
    data, k = synthetic_world, 5
    manifest = Manifest.load(data)
    truth = load_synthetic_truth(data, manifest)
    assert truth is not None
    weights = {"click": 1.0, "like": 0.5, "long_view": 0.25}
    corpus = ItemFeatureStore.load(data, manifest).corpus_ids()
    users = [4, 31]
    brute = {u: _brute_force_values(data, u, weights) for u in users}
    best = {u: sorted(range(len(brute[u])), key=lambda i: -brute[u][i])[:k] for u in users}
    # User 4: three of its truly best items and two others; user 31: k arbitrary items.
    chosen = {4: [*best[4][:3], 50, 77], 31: [0, 1, 2, 3, 119]}
    got = top_k_truth(
        TruthScorer(truth, corpus, weights),
        torch.tensor(users),
        torch.tensor([chosen[u] for u in users]),
    )
    for row, user in enumerate(users):
        expected_reward = sum(brute[user][i] for i in chosen[user]) / k
        expected_recall = len(set(chosen[user]) & set(best[user])) / k
        oracle = sum(brute[user][i] for i in best[user]) / k
        assert float(got.truth_reward[row]) == pytest.approx(expected_reward, rel=1e-9)
        assert float(got.truth_recall[row]) == pytest.approx(expected_recall)
        assert float(got.truth_oracle[row]) == pytest.approx(oracle, rel=1e-9)
    assert float(got.truth_recall[0]) == pytest.approx(3 / k)


def test_the_truth_is_the_click_model_of_the_simulated_feed(synthetic_world: Path) -> None:
    """Every train impression's labels against the truth's probabilities times examination
    ``1 / (1 + position)^0.7``: the means agree within 4 standard errors."""
    data = synthetic_world
    manifest = Manifest.load(data)
    truth = load_synthetic_truth(data, manifest)
    assert truth is not None
    columns = ["user_id", "item_id", "position", "label_click", "label_like", "label_long_view"]
    table = pq.ParquetDataset(manifest.split_paths(data, "train")).read(columns=columns)
    rows = {name: torch.from_numpy(table.column(name).to_numpy()) for name in columns}
    examination = (1.0 + rows["position"].double()) ** -0.7
    users, items = rows["user_id"].long(), rows["item_id"].long()
    for label in ("click", "like", "long_view"):
        probability = examination * pair_values(truth, users, items[:, None], {label: 1.0})[:, 0]
        stderr = float((probability * (1 - probability)).sum().sqrt()) / len(probability)
        observed = float(rows[f"label_{label}"].double().mean())
        assert abs(observed - float(probability.mean())) < 4 * stderr, (label, observed, stderr)


class TruthReward:
    """A reward model that knows the world: its true expected NUV (``sign=-1``: one that
    prefers exactly what users do not, the extreme of reward hacking)."""

    def __init__(self, truth: SyntheticTruth, sign: float = 1.0) -> None:
        self.truth, self.sign = truth, sign

    def __call__(self, user_features: KeyedJaggedTensor, item_ids: torch.Tensor) -> torch.Tensor:
        users = user_features["user_id"].values().to(item_ids.device)
        values = pair_values(self.truth, users, item_ids, TRUTH_WEIGHTS)
        return self.sign * values.float()


def _synthetic_align_config(synthetic_run: dict[str, Path], run_dir: Path) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"data.path={synthetic_run['data']}",
            f"run.dir={run_dir}",
            f"checkpoint.resume_from={synthetic_run['base']}",
            "alignment.k=12",
            "alignment.top_n=4",
            "alignment.train.dense_lr=0.01",
            "alignment.train.sparse_lr=0.1",
            "alignment.kl_coefficient=0.0",
            "alignment.train.max_steps=20",
            *SYNTHETIC,
        ],
    )


def _truth_reward(data: Path, sign: float) -> TruthReward:
    truth = load_synthetic_truth(data, Manifest.load(data))
    assert truth is not None
    return TruthReward(truth, sign)


def _align_synthetic(synthetic_run: dict[str, Path], run_dir: Path, sign: float) -> Any:
    config = _synthetic_align_config(synthetic_run, run_dir)
    try:
        return align(config, _truth_reward(synthetic_run["data"], sign))
    finally:
        shutdown()


@pytest.mark.slow
def test_align_reports_ground_truth_beside_the_reward(
    synthetic_run: dict[str, Path], tmp_path: Path
) -> None:
    result = _align_synthetic(synthetic_run, tmp_path / "aligned", 1.0)
    # The reward is the truth under the same label weights: both paths measure the same thing.
    assert result.truth_reward_before == pytest.approx(result.reward_before, rel=1e-5)
    assert result.truth_reward_after == pytest.approx(result.reward_after, rel=1e-5)
    assert result.truth_reward_gain_stderr is not None and result.truth_reward_gain_stderr > 0
    gain = result.truth_reward_after - result.truth_reward_before
    assert gain > 3 * result.truth_reward_gain_stderr, result
    assert result.truth_recall_after > result.truth_recall_before, result
    assert 0 <= result.truth_recall_before <= 1 and 0 <= result.truth_recall_after <= 1
    assert result.truth_oracle_reward >= result.truth_reward_after
    summary = json.loads((tmp_path / "aligned" / ALIGN_SUMMARY_FILE).read_text())
    logged = json.loads((tmp_path / "aligned" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("truth_reward_before", "truth_reward_after", "truth_recall_after"):
        assert summary[key] == pytest.approx(getattr(result, key)) == logged[key]


@pytest.mark.slow
def test_reward_hacking_shows_in_the_ground_truth(
    synthetic_run: dict[str, Path], tmp_path: Path
) -> None:
    hacked = _align_synthetic(synthetic_run, tmp_path / "hacked", -1.0)
    assert hacked.reward_after > hacked.reward_before + 3 * hacked.reward_gain_stderr, hacked
    assert hacked.truth_reward_gain_stderr is not None
    assert hacked.truth_reward_after < (
        hacked.truth_reward_before - 3 * hacked.truth_reward_gain_stderr
    ), hacked
    assert hacked.truth_recall_after < hacked.truth_recall_before, hacked


def _two_ranks_synthetic(rank: int, world_size: int, data: str, base: str, run_dir: str) -> dict:
    config = _synthetic_align_config({"data": Path(data), "base": Path(base)}, Path(run_dir))
    return align(config, _truth_reward(Path(data), 1.0)).measures()


@pytest.mark.slow
def test_ground_truth_over_two_gloo_ranks_matches_one(
    synthetic_run: dict[str, Path], tmp_path: Path
) -> None:
    args = (str(synthetic_run["data"]), str(synthetic_run["base"]))
    one = run_distributed(_two_ranks_synthetic, 1, *args, str(tmp_path / "one"))[0]
    two = run_distributed(_two_ranks_synthetic, 2, *args, str(tmp_path / "two"))
    assert two[0] == two[1]
    # Before alignment both measure the same start model over the same rows.
    for key in ("reward_before", "truth_reward_before", "truth_recall_before"):
        assert two[0][key] == pytest.approx(one[key], abs=1e-9), key
    assert two[0]["truth_oracle_reward"] == pytest.approx(one["truth_oracle_reward"], abs=1e-9)


def test_alignment_rebuilds_the_start_runs_model_with_every_feature_kind(tmp_path: Path) -> None:
    """The job's config names no model or feature key: the start run's saved config supplies
    them (weighted text, counters, context, search, affinity included); a contradicting key is
    an error naming it with both values."""
    from trainer.train import train

    root = write_tiny_dataset(tmp_path / "data", all_kinds=True)
    base = tmp_path / "base"
    model_keys, job_keys = MODEL[:5], MODEL[5:]
    job = [
        f"data.path={root}",
        f"checkpoint.resume_from={base}",
        "alignment.k=8",
        "alignment.top_n=3",
        "alignment.train.max_steps=2",
        *job_keys,
    ]
    from trainer.ranker_train import train_ranker

    ranker = tmp_path / "ranker"
    try:
        # The demo's shape: the retrieval run reads fewer features than the ranker (every one).
        train(
            load_config(
                None,
                [
                    f"data.path={root}",
                    f"run.dir={base}",
                    "train.max_steps=4",
                    "data.recent_history=2",
                    "features.groups=[id,history,categorical,text]",
                    *model_keys,
                    *job_keys,
                ],
            )
        )
        train_ranker(
            load_config(
                None,
                [
                    f"data.path={root}",
                    f"run.dir={ranker}",
                    "ranker.train.max_steps=4",
                    "data.recent_history=2",
                    "ranker.embedding_dim=8",
                    "ranker.mlp=[16]",
                    *job_keys,
                ],
            )
        )
        aligned = [*job, f"run.dir={tmp_path / 'aligned'}", f"alignment.reward_checkpoint={ranker}"]
        result = align(load_config(None, aligned))
        assert result.steps == 2 and result.reward_after > 0
        bad = load_config(None, [*job, f"run.dir={tmp_path / 'bad'}", "model.output_dim=24"])
        with pytest.raises(ConfigError, match="model.output_dim: 24 here, 16 in the start run"):
            align(bad, KnownReward())
    finally:
        shutdown()
    trained = load_config(base / "config.yaml")
    saved = load_config(tmp_path / "aligned" / "config.yaml")
    assert saved.model == trained.model and saved.features == trained.features
    assert saved.data.recent_history == 2 and len(saved.features.groups) == 4
