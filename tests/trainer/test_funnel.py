"""Funnel consistency: overlap@K and NDCG against a ranker (and a synthetic world's truth)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from config import ConfigError, load_config
from data_pipeline.datasets.synthetic import prepare_synthetic
from tests.dist_helpers import run_distributed
from trainer.evaluation.eval_run import evaluate_run
from trainer.evaluation.funnel import ndcg_against, overlap_at
from trainer.ranker_train import train_ranker
from trainer.train import train

COMMON = [
    "data.batch_size=64",
    "data.eval_batch_size=64",
    "data.num_workers=0",
    "train.progress_bar=false",
    "ranker.train.progress_bar=false",
    "logging.wandb=false",
    "loss.label_weights={click: 1.0, like: 0.5}",
]
RETRIEVAL = ["model.embedding_dim=16", "model.user_mlp=[32]", "model.item_mlp=[32]"]
RETRIEVAL += ["model.output_dim=16", "train.epochs=1", "eval.at_end=false"]
RANKER = ["ranker.embedding_dim=8", "ranker.mlp=[16]", "ranker.low_rank=4", "ranker.train.epochs=1"]


def test_overlap_and_ndcg_match_reference_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    gains = torch.rand(5, 30, generator=generator, dtype=torch.float64)
    retrieved = torch.stack([torch.randperm(30, generator=generator)[:12] for _ in range(5)])
    reference = gains.argsort(dim=1, descending=True)
    for k in (1, 5, 10):
        overlap = overlap_at(retrieved, reference, k)
        ndcg = ndcg_against(torch.gather(gains, 1, retrieved), gains, k)
        for q in range(5):
            expected = len(set(retrieved[q].tolist()) & set(reference[q, :k].tolist())) / k
            assert overlap[q].item() == pytest.approx(expected)
            dcg = sum(gains[q, retrieved[q, i]].item() / math.log2(i + 2) for i in range(k))
            ideal = sum(gains[q, reference[q, i]].item() / math.log2(i + 2) for i in range(k))
            assert ndcg[q].item() == pytest.approx(dcg / ideal)
    # Retrieving the ranker's own order is perfect.
    assert torch.allclose(
        ndcg_against(gains.sort(1, True).values, gains, 10), torch.ones(5, dtype=torch.float64)
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small synthetic world, a ranker and a retrieval run trained on it."""
    root = tmp_path_factory.mktemp("funnel")
    data = root / "data"
    prepare_synthetic(
        users=60, items=120, events=6000, seed=3, out=data, history_length=5, chunk_events=3000
    )
    ranker_dir, retrieval_dir = root / "ranker", root / "retrieval"
    base = [*COMMON, f"data.path={data}", "loss.label_weights={click: 1.0, like: 0.5}"]
    train_ranker(load_config(None, [*base, *RANKER, f"run.dir={ranker_dir}"]))
    train(load_config(None, [*base, *RETRIEVAL, f"run.dir={retrieval_dir}"]))
    return {"data": data, "ranker": ranker_dir, "retrieval": retrieval_dir}


def _funnel(rank: int, world_size: int, run: str, overrides: list[str]) -> dict[str, float]:
    return evaluate_run(run, None, overrides)["funnel"]


def test_funnel_metrics_one_and_two_ranks_agree(world: dict[str, Any]) -> None:
    overrides = [f"eval.funnel.ranker={world['ranker']}", "eval.funnel.max_queries=15"]
    one = run_distributed(_funnel, 1, str(world["retrieval"]), overrides)[0]
    two = run_distributed(_funnel, 2, str(world["retrieval"]), overrides)
    assert two[0] == two[1]
    assert one.keys() == two[0].keys()
    for name, value in one.items():
        assert two[0][name] == pytest.approx(value, abs=1e-9), name
    assert one["queries"] == 15  # a sample of the split (21 rows)
    expected = {"overlap@10", "ranker_ndcg@10", "truth_overlap@10", "truth_ndcg@10"}
    assert expected <= one.keys() and "ranker_truth_ndcg@50" in one
    for name, value in one.items():
        if name != "queries":
            assert 0.0 <= value <= 1.0, (name, value)
    # Retrieval, trained on the world's clicks, orders items by true relevance far better than
    # a random order does.
    assert one["truth_ndcg@10"] > _random_truth_ndcg(world["data"], 10) + 0.2


def _random_truth_ndcg(data: Path, k: int) -> float:
    import numpy as np

    arrays = {n: np.load(data / "truth" / f"{n}.npy") for n in ("user_factors", "item_factors")}
    bias = np.load(data / "truth" / "item_bias.npy")
    gains = torch.sigmoid(
        torch.from_numpy(arrays["user_factors"] @ arrays["item_factors"].T + bias)
    )
    generator = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(gains.shape[1], generator=generator) for _ in gains])
    return float(ndcg_against(torch.gather(gains.double(), 1, order), gains.double(), k).mean())


def test_retrieving_the_whole_corpus_loses_nothing(world: dict[str, Any]) -> None:
    overrides = [
        f"eval.funnel.ranker={world['ranker']}",
        "eval.funnel.max_queries=20",
        "eval.funnel.retrieve_n=120",  # every item of the corpus
    ]
    metrics = run_distributed(_funnel, 1, str(world["retrieval"]), overrides)[0]
    assert metrics["overlap@10"] == metrics["overlap@50"] == 1.0
    assert metrics["truth_overlap@50"] == 1.0


def test_funnel_cutoffs_are_validated() -> None:
    with pytest.raises(ConfigError, match="eval.funnel.ks"):
        load_config(None, ["eval.funnel.ks=[200]", "eval.funnel.retrieve_n=100"])


def test_cli_flag_sets_the_ranker(tmp_path: Path) -> None:
    from launch.cli import _parser

    args = _parser().parse_args(["eval", "--run", "r", "--ranker", "some/ranker", "eval.ks=[5]"])
    assert args.ranker == "some/ranker" and args.overrides == ["eval.ks=[5]"]
