"""Means of per-query metrics over every rank's queries, with bootstrap confidence intervals.

The interval is a percentile bootstrap over users, the unit that was sampled: one user's
queries (several test clicks on a feed, several held-out events under a global temporal split)
are not independent, and resampling them one by one would understate the uncertainty.
Resampling users with replacement (the multinomial bootstrap) needs every query on one process;
the Poisson bootstrap (Hanley and MacGibbon 2006; Chamandy et al. 2012) gives each user an
independent Poisson(1) weight per replicate instead, the multinomial's limit for many users,
so every rank weights its own queries: a replicate's mean is ``sum_q w_r(user_q) v_q /
sum_q w_r(user_q)`` summed over ranks with one all-reduce of [R, M] numerators and
denominators. Subset metrics (tail and cold recall) are ratios over their own queries, which the
weights handle unchanged (``included`` masks).

A weight is a hash of (seed, replicate, user id) through Poisson(1)'s inverse CDF, so the
interval does not depend on the world size, on which rank holds a query, or on query order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from trainer.evaluation.metrics import QueryValues

# Queries weighted per block: a [R, block] float64 weight matrix at a time.
QUERY_BLOCK = 4096


@dataclass(frozen=True)
class BootstrapConfig:
    """``replicates`` R (0: no interval), the two-sided ``level``, and the ``seed``."""

    replicates: int = 1000
    level: float = 0.95
    seed: int = 0


_MASK_32 = (1 << 32) - 1
# Poisson(1) CDF at 0..15; beyond 15 the probability is below 1e-13.
_POISSON_CDF = torch.tensor(
    np.cumsum([math.exp(-1) / math.factorial(k) for k in range(16)]), dtype=torch.float64
)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK_32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK_32
    return x ^ (x >> 16)


def poisson_weights(seed: int, replicates: int, cluster_ids: torch.Tensor) -> torch.Tensor:
    """[R, Q] float64 Poisson(1) weights: a pure function of (seed, replicate, cluster id), the
    same for every query of a cluster.

    Args:
        cluster_ids: [Q] int64 (non-negative; e.g. user ids).
    """
    ids = cluster_ids.to(torch.int64).reshape(1, -1)
    rows = torch.arange(replicates, dtype=torch.int64).reshape(-1, 1)
    key = _mix32(_mix32(torch.full_like(rows, seed & _MASK_32)) ^ rows)
    key = _mix32(key ^ (ids >> 32))
    key = _mix32(key ^ (ids & _MASK_32))
    uniform = (key.double() + 0.5) / float(1 << 32)
    return torch.searchsorted(_POISSON_CDF, uniform).double()


def replicate_sums(
    per_query: dict[str, QueryValues], replicates: int, seed: int, cluster_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of this rank's queries under R Poisson replicates.

    Args:
        per_query: M metrics, each over the same Q queries.
        cluster_ids: [Q] int64 the unit each query's weight belongs to (its user).
    Returns:
        numerators [R, M] ``sum_q w_rq v_q [included]``, denominators [R, M]
        ``sum_q w_rq [included]`` (float64, on the CPU).
    """
    names = list(per_query)
    num_queries = len(next(iter(per_query.values())).values) if names else 0
    numerators = torch.zeros(replicates, len(names), dtype=torch.float64)
    denominators = torch.zeros_like(numerators)
    if not names:
        return numerators, denominators
    included = torch.stack([per_query[n].included.cpu() for n in names], dim=1).double()
    values = torch.stack([per_query[n].values.cpu().double() for n in names], dim=1)
    values = torch.where(included > 0, values, 0.0)  # NaN outside ``included`` must add 0
    for start in range(0, num_queries, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, num_queries)
        weights = poisson_weights(seed, replicates, cluster_ids[start:stop].cpu())
        numerators += weights @ (values[start:stop] * included[start:stop])
        denominators += weights @ included[start:stop]
    return numerators, denominators


def percentile_interval(
    numerators: torch.Tensor, denominators: torch.Tensor, level: float
) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of the replicate means.

    Args:
        numerators, denominators: [R] one metric's replicate sums; replicates with no weight
            at all are dropped.
    Returns:
        (low, high); NaN when no replicate has weight.
    """
    live = denominators > 0
    if not bool(live.any()):
        return math.nan, math.nan
    means = (numerators[live] / denominators[live]).numpy()
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def reduce_query_means(
    per_query: dict[str, QueryValues],
    cluster_ids: torch.Tensor,
    bootstrap: BootstrapConfig,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Means over all ranks' queries and their bootstrap intervals over clusters (users).
    Collective.

    A rank without queries passes empty [0] tensors and adds nothing.

    Args:
        per_query: this rank's M metrics over its Q queries.
        cluster_ids: [Q] int64 each query's user.
    Returns:
        ({name: mean, NaN where no rank has an included query}, {name: [low, high]}, the
        latter empty when ``bootstrap.replicates`` is 0).
    """
    names = list(per_query)
    point = torch.tensor(
        [
            [float(per_query[n].values[per_query[n].included].double().sum()) for n in names],
            [float(per_query[n].included.sum()) for n in names],
        ],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(point)
    sums, counts = point.cpu()
    means = {
        n: float(s / c) if c > 0 else math.nan for n, s, c in zip(names, sums, counts, strict=True)
    }
    if bootstrap.replicates == 0:
        return means, {}
    numerators, denominators = replicate_sums(
        per_query, bootstrap.replicates, bootstrap.seed, cluster_ids
    )
    both = torch.stack([numerators, denominators]).to(device)
    dist.all_reduce(both)
    numerators, denominators = both.cpu()
    intervals = {
        n: list(percentile_interval(numerators[:, i], denominators[:, i], bootstrap.level))
        for i, n in enumerate(names)
    }
    return means, intervals
