"""The alignment phase end to end on the tiny dataset: with a reward whose answer is known it
raises the policy's expected reward (top-K and corpus softmax), a larger KL coefficient keeps the
policy nearer the reference, a trained ranker works as the reward model through the CLI (and
``twotower eval --run`` evaluates the aligned run), 2 gloo ranks agree, config mistakes name
their key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchrec import KeyedJaggedTensor

from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from launch.cli import main as cli_main
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from trainer.align import (
    SUMMARY_FILE,
    align,
    alignment_sources,
    embed_items,
    load_reference,
    sample_candidates,
    user_keys,
)
from trainer.build import loader_spec
from trainer.config import ConfigError, ExperimentConfig, load_config
from trainer.distributed import shutdown

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
        ("alignment.steps=0", "alignment.steps"),
        ("alignment.lr=0", "alignment.lr"),
        ("alignment.exploration=popular", "alignment.exploration"),
        ("alignment.rewardz=x", "alignment.rewardz"),
    ],
)
def test_bad_alignment_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_dpo_needs_a_positive_beta() -> None:
    with pytest.raises(ConfigError, match="'alignment.kl_coefficient'"):
        load_config(None, ["alignment.method=dpo", "alignment.kl_coefficient=0"])


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
            "alignment.lr=0.01",
            "alignment.sparse_lr=0.1",
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
                root, base, run_dir, "alignment.steps=30", f"alignment.kl_coefficient={kl}"
            )
            results[kl] = align(config, KnownReward())
            stats[kl] = _corpus_softmax_stats(config, run_dir, base)
    finally:
        shutdown()
    free = results[0.0]
    assert free.steps == 30 and free.checkpoint.endswith("step-30")
    assert free.reward_after > free.reward_before + 0.2, free
    start_reward, _ = _corpus_softmax_stats(_align_config(root, base, tmp_path / "x"), base, base)
    assert stats[0.0][0] > start_reward + 0.1, (start_reward, stats)  # corpus softmax, too
    assert stats[20.0][1] < 0.5 * stats[0.0][1], stats  # KL to the reference
    assert json.loads((tmp_path / "aligned_kl0.0" / SUMMARY_FILE).read_text())["steps"] == 30


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
                    "train.max_steps=6",
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
    assert cli_main(["align", "-", *args, "alignment.steps=3"]) == 2  # no such config file
    base_config = str(base / "config.yaml")  # the usual call: the start run's own config
    assert cli_main(["align", base_config, *args, "alignment.steps=3"]) == 0
    assert cli_main(["align", base_config, *args, "alignment.steps=5"]) == 0  # resumes at 3
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["steps"] == 5 and summary["checkpoint"].endswith("step-5")
    assert summary["reward_before"] > 0
    assert cli_main(["eval", "--run", str(run_dir)]) == 0
    assert (run_dir / "metrics.json").exists()


def _two_ranks(rank: int, world_size: int, root: str, base: str, run_dir: str) -> dict:
    config = _align_config(Path(root), Path(base), Path(run_dir), "alignment.steps=4")
    result = align(config, KnownReward())
    return {"before": result.reward_before, "after": result.reward_after, "steps": result.steps}


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path: Path) -> None:
    root, base = _base_run(tmp_path)
    results = run_distributed(_two_ranks, 2, str(root), str(base), str(tmp_path / "aligned"))
    assert results[0] == results[1] and results[0]["steps"] == 4
    assert (tmp_path / "aligned" / "checkpoints" / "step-4" / ".complete").exists()
