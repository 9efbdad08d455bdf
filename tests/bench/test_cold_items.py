"""``bench.cold_items``: target ranks over the whole corpus and among cold items only."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.cold_items import cold_report, target_ranks
from config import load_config
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import TINY_MODEL, USERS, write_tiny_dataset
from trainer.train import train


def test_target_ranks_count_ties_above() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.2]])
    assert target_ranks(scores, torch.tensor([2, 1])).tolist() == [2, 2]
    assert target_ranks(scores, torch.tensor([1, 2])).tolist() == [1, 3]


def _train(rank: int, world_size: int, overrides: list[str]) -> int:
    return train(load_config(None, overrides)).steps


def _report(rank: int, world_size: int, run: str, max_events: int) -> dict:
    return cold_report(Path(run), max_events)


def test_every_item_cold_ranks_equal_whole_corpus_ranks(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", all_kinds=True)
    run = tmp_path / "run"
    overrides = [
        *TINY_MODEL,
        f"data.path={root}",
        f"run.dir={run}",
        "data.num_workers=0",
        "eval.at_end=false",
        "train.max_steps=5",
    ]
    run_distributed(_train, 1, overrides)
    assert OmegaConf.load(run / "config.yaml").data.path == str(root)
    # Every item has fewer than 10**9 training events: all test rows are cold, and ranking among
    # the cold items is ranking among all items.
    row = run_distributed(_report, 1, str(run), 10**9)[0]
    assert row["cold rows"] == USERS and row["step"] == 5
    assert row["median rank"] == row["median rank among cold"]
    none = run_distributed(_report, 1, str(run), 1)[0]
    assert none["cold rows"] == 0
