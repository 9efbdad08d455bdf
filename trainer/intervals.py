"""Means of per-query metrics over every rank's queries, with bootstrap confidence intervals.

The interval is a percentile bootstrap over queries. Resampling Q queries with replacement
(the multinomial bootstrap) needs every query on one process; the Poisson bootstrap (Hanley and
MacGibbon 2006; Chamandy et al. 2012) draws each query's replicate weight independently from
Poisson(1) instead, which is the multinomial's limit for large Q and lets every rank weight its
own queries: a replicate's mean is ``sum_q w_rq v_q / sum_q w_rq`` summed over ranks with one
all-reduce of [R, M] numerators and denominators. Subset metrics (tail and cold recall) are
ratios over their own queries, which the weights handle unchanged (``included`` masks).

The weights depend on (seed, rank): the same seed, data and world size give the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from trainer.metrics import QueryValues

# Queries weighted per block: a [R, block] float64 weight matrix at a time.
QUERY_BLOCK = 4096


@dataclass(frozen=True)
class BootstrapConfig:
    """``replicates`` R (0: no interval), the two-sided ``level``, and the ``seed``."""

    replicates: int = 1000
    level: float = 0.95
    seed: int = 0


def poisson_weights(replicates: int, num_queries: int, generator: torch.Generator) -> torch.Tensor:
    """[R, Q] float64 independent Poisson(1) replicate weights of Q queries."""
    rates = torch.ones(replicates, num_queries, dtype=torch.float64)
    return torch.poisson(rates, generator=generator)


def replicate_sums(
    per_query: dict[str, QueryValues], replicates: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of this rank's queries under R Poisson replicates.

    Args:
        per_query: M metrics, each over the same Q queries.
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
        weights = poisson_weights(replicates, stop - start, generator)
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
    per_query: dict[str, QueryValues], bootstrap: BootstrapConfig, rank: int, device: torch.device
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Means over all ranks' queries and their bootstrap intervals. Collective.

    A rank without queries passes empty [0] tensors and adds nothing.

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
    generator = torch.Generator().manual_seed(_rank_seed(bootstrap.seed, rank))
    numerators, denominators = replicate_sums(per_query, bootstrap.replicates, generator)
    both = torch.stack([numerators, denominators]).to(device)
    dist.all_reduce(both)
    numerators, denominators = both.cpu()
    intervals = {
        n: list(percentile_interval(numerators[:, i], denominators[:, i], bootstrap.level))
        for i, n in enumerate(names)
    }
    return means, intervals


def _rank_seed(seed: int, rank: int) -> int:
    state = np.random.SeedSequence([seed, rank, 0x626F6F74]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)
