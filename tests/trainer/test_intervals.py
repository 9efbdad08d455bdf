"""Bootstrap intervals of per-query means: the Poisson bootstrap against the brute-force
multinomial bootstrap of the same values, its coverage of a known mean, and 2 ranks against one
process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.dist_helpers import run_distributed
from trainer.intervals import (
    BootstrapConfig,
    percentile_interval,
    reduce_query_means,
    replicate_sums,
)
from trainer.metrics import QueryValues


def _poisson_interval(values: np.ndarray, replicates: int, seed: int) -> tuple[float, float]:
    per_query = {"m": QueryValues(torch.from_numpy(values), torch.ones(len(values), dtype=bool))}
    numerators, denominators = replicate_sums(
        per_query, replicates, torch.Generator().manual_seed(seed)
    )
    return percentile_interval(numerators[:, 0], denominators[:, 0], 0.95)


def _multinomial_interval(values: np.ndarray, replicates: int, seed: int) -> tuple[float, float]:
    """The textbook bootstrap: resample Q queries with replacement, R times."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(replicates, len(values)))
    means = values[draws].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def test_poisson_bootstrap_matches_the_multinomial_bootstrap() -> None:
    rng = np.random.default_rng(3)
    hits = (rng.random(2000) < 0.3).astype(np.float64)  # a hit rate over 2,000 queries
    ranks = 1.0 / rng.integers(1, 50, size=2000)  # a reciprocal-rank-like skewed metric
    for values in (hits, ranks):
        poisson = _poisson_interval(values, 4000, seed=1)
        multinomial = _multinomial_interval(values, 4000, seed=2)
        # Each endpoint's Monte-Carlo error at R = 4,000 is about 5% of the half-width.
        half_width = (multinomial[1] - multinomial[0]) / 2
        assert poisson == pytest.approx(multinomial, abs=0.15 * half_width)
    # ... and both match the normal interval of a proportion.
    p = hits.mean()
    normal = 1.96 * np.sqrt(p * (1 - p) / len(hits))
    low, high = _poisson_interval(hits, 4000, seed=1)
    assert (high - low) / 2 == pytest.approx(normal, rel=0.1)


def test_interval_covers_the_true_mean_at_its_level() -> None:
    rng = np.random.default_rng(0)
    trials, covered = 200, 0
    for trial in range(trials):
        values = (rng.random(400) < 0.2).astype(np.float64)
        low, high = _poisson_interval(values, 500, seed=trial)
        covered += low <= 0.2 <= high
    # 200 trials of a 95% interval: 190 expected, standard deviation about 3.
    assert 180 <= covered <= 198


def test_included_mask_equals_bootstrapping_only_those_queries() -> None:
    rng = np.random.default_rng(5)
    values = rng.random(3000)
    included = rng.random(3000) < 0.25
    masked = {"m": QueryValues(torch.from_numpy(values), torch.from_numpy(included))}
    numerators, denominators = replicate_sums(masked, 4000, torch.Generator().manual_seed(0))
    low, high = percentile_interval(numerators[:, 0], denominators[:, 0], 0.95)
    alone = _multinomial_interval(values[included], 4000, seed=9)
    assert (low, high) == pytest.approx(alone, abs=0.15 * (alone[1] - alone[0]) / 2)


def test_same_seed_same_interval_and_nan_outside_included_adds_nothing() -> None:
    values = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    included = torch.tensor([True, False, True, True])
    per_query = {"m": QueryValues(values, included)}
    first = replicate_sums(per_query, 50, torch.Generator().manual_seed(4))
    second = replicate_sums(per_query, 50, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], second[0]) and not torch.isnan(first[0]).any()
    assert percentile_interval(torch.zeros(3), torch.zeros(3), 0.95) != (0.0, 0.0)


def _rank_share(rank: int, world_size: int, values: np.ndarray) -> tuple[dict, dict]:
    share = np.array_split(values, world_size)[rank]
    per_query = {
        "m": QueryValues(torch.from_numpy(share), torch.ones(len(share), dtype=torch.bool)),
        "none": QueryValues(torch.from_numpy(share), torch.zeros(len(share), dtype=torch.bool)),
    }
    return reduce_query_means(per_query, BootstrapConfig(2000, 0.95, 7), rank, torch.device("cpu"))


def test_two_ranks_give_the_mean_of_all_queries_and_a_matching_interval() -> None:
    values = (np.random.default_rng(11).random(1500) < 0.4).astype(np.float64)
    per_rank = run_distributed(_rank_share, 2, values)
    (means, intervals), (other_means, other_intervals) = per_rank
    assert means["m"] == other_means["m"] and intervals["m"] == other_intervals["m"]
    assert means["m"] == pytest.approx(values.mean())
    assert np.isnan(means["none"]) and all(np.isnan(intervals["none"]))
    one = _multinomial_interval(values, 4000, seed=1)
    assert intervals["m"] == pytest.approx(one, abs=0.15 * (one[1] - one[0]) / 2)
