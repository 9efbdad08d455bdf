"""Bootstrap intervals of per-query means: the Poisson weights against Poisson(1) itself, the
Poisson bootstrap against the brute-force multinomial bootstrap of the same values (over
queries, and over users when a user has several queries), its coverage of a known mean, and 2
ranks against one process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.dist_helpers import run_distributed
from trainer.evaluation.intervals import (
    BootstrapConfig,
    percentile_interval,
    poisson_weights,
    reduce_query_means,
    replicate_sums,
)
from trainer.evaluation.metrics import QueryValues


def _all(values: np.ndarray) -> dict[str, QueryValues]:
    return {"m": QueryValues(torch.from_numpy(values), torch.ones(len(values), dtype=torch.bool))}


def _poisson_interval(
    values: np.ndarray, replicates: int, seed: int, users: np.ndarray | None = None
) -> tuple[float, float]:
    clusters = torch.arange(len(values)) if users is None else torch.from_numpy(users)
    numerators, denominators = replicate_sums(_all(values), replicates, seed, clusters)
    return percentile_interval(numerators[:, 0], denominators[:, 0], 0.95)


def _multinomial_interval(values: np.ndarray, replicates: int, seed: int) -> tuple[float, float]:
    """The textbook bootstrap: resample the Q values with replacement, R times."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(replicates, len(values)))
    means = values[draws].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def test_weights_are_poisson_one_per_cluster() -> None:
    clusters = torch.arange(20_000) * 7919 + (1 << 40)  # ids beyond 32 bits too
    weights = poisson_weights(3, 50, clusters)  # 10^6 draws
    counts = torch.bincount(weights.long().flatten(), minlength=8)[:8].double()
    expected = torch.tensor([math.exp(-1) / math.factorial(k) for k in range(8)]) * weights.numel()
    # Each frequency within 5 standard deviations of its binomial expectation.
    assert torch.all((counts - expected).abs() <= 5 * expected.sqrt() + 1)
    assert float(weights.mean()) == pytest.approx(1.0, abs=0.005)
    assert float(weights.var()) == pytest.approx(1.0, abs=0.01)
    # Replicates and neighbouring clusters are uncorrelated; one cluster, one weight.
    assert abs(float(torch.corrcoef(weights[:2])[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(weights[:, :2].T)[0, 1])) < 0.3  # 50 replicates
    repeated = poisson_weights(3, 50, torch.tensor([11, 5, 11]))
    assert torch.equal(repeated[:, 0], repeated[:, 2])
    assert not torch.equal(poisson_weights(4, 50, clusters[:100]), weights[:, :100])


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


def test_users_with_several_queries_are_resampled_whole() -> None:
    """Each of 500 users has 4 identical queries: the interval is that of the 500 user means
    (brute force), twice as wide as a bootstrap that treats the 2,000 queries as independent."""
    per_user = (np.random.default_rng(8).random(500) < 0.3).astype(np.float64)
    users = np.repeat(np.arange(500), 4) * 13
    values = np.repeat(per_user, 4)
    clustered = _poisson_interval(values, 4000, seed=5, users=users)
    by_user = _multinomial_interval(per_user, 4000, seed=6)
    width = by_user[1] - by_user[0]
    assert clustered == pytest.approx(by_user, abs=0.075 * width)
    naive = _poisson_interval(values, 4000, seed=5)
    assert (clustered[1] - clustered[0]) / (naive[1] - naive[0]) == pytest.approx(2.0, rel=0.15)


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
    numerators, denominators = replicate_sums(masked, 4000, 0, torch.arange(3000))
    low, high = percentile_interval(numerators[:, 0], denominators[:, 0], 0.95)
    alone = _multinomial_interval(values[included], 4000, seed=9)
    assert (low, high) == pytest.approx(alone, abs=0.15 * (alone[1] - alone[0]) / 2)


def test_nan_outside_included_adds_nothing_and_no_weight_is_nan() -> None:
    values = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    included = torch.tensor([True, False, True, True])
    sums = replicate_sums({"m": QueryValues(values, included)}, 50, 4, torch.arange(4))
    assert not torch.isnan(sums[0]).any()
    assert all(map(math.isnan, percentile_interval(torch.zeros(3), torch.zeros(3), 0.95)))


def _rank_share(rank: int, world_size: int, values: np.ndarray, users: np.ndarray) -> tuple:
    order = np.random.default_rng(rank).permutation(len(values) // world_size)
    share = np.array_split(np.arange(len(values)), world_size)[rank][order]
    per_query = {
        "m": QueryValues(torch.from_numpy(values[share]), torch.ones(len(share), dtype=torch.bool)),
        "none": QueryValues(
            torch.from_numpy(values[share]), torch.zeros(len(share), dtype=torch.bool)
        ),
    }
    bootstrap = BootstrapConfig(2000, 0.95, 7)
    return reduce_query_means(
        per_query, torch.from_numpy(users[share]), bootstrap, torch.device("cpu")
    )


def test_two_ranks_give_the_interval_of_all_queries_in_one_process() -> None:
    """The weights depend on (seed, replicate, user) only: which rank holds a query, and in
    which order, changes nothing."""
    rng = np.random.default_rng(11)
    values = (rng.random(1500) < 0.4).astype(np.float64)
    users = rng.integers(0, 600, size=1500)
    per_rank = run_distributed(_rank_share, 2, values, users)
    for means, intervals in per_rank:
        assert means["m"] == pytest.approx(values.mean())
        assert math.isnan(means["none"]) and all(map(math.isnan, intervals["none"]))
        numerators, denominators = replicate_sums(_all(values), 2000, 7, torch.from_numpy(users))
        alone = percentile_interval(numerators[:, 0], denominators[:, 0], 0.95)
        assert intervals["m"] == pytest.approx(list(alone), abs=1e-12)
