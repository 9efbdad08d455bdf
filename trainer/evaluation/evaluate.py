"""Evaluation: exact top-K over the whole item corpus, sharded over ranks, against a most-popular
baseline computed the same way (same queries, same exclusions, same metrics).

Protocol: one query per row of the eval split (user features and history as of that event); the
target is the row's item. ``eval.exclude`` (``trainer.evaluation.exclusion``) names the user's earlier items
removed from every ranking, the target included when the rule says so (it then counts as a miss).
Every metric is a mean over queries with a percentile-bootstrap interval over users
(``trainer.evaluation.intervals``);
``metrics.json`` holds the means, the intervals, the query count and the protocol.

Tail recall (``tail_recall@K`` for every K in ``eval.ks``, plus the ``tail_queries`` fraction) is
recall over the queries whose target is a long-tail item: outside the ``HEAD_FRACTION`` (20%)
most popular of the items with any training interaction (``trainer.evaluation.metrics.tail_items``).
Cold recall (``cold_recall@K``, ``cold_queries``) is the same over the queries whose target has
fewer than ``eval.cold_item_max_events`` training events (``trainer.evaluation.metrics.cold_items``).
``tail_rows`` and ``cold_rows`` count those queries over all ranks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from config import ExcludeRule, ExperimentConfig
from data_pipeline.manifest import Manifest
from data_pipeline.schema import ITEM_ID, USER_ID
from data_pipeline.split_table import read_split_columns
from models.light_ranker import head_module
from trainer.build import label_weights
from trainer.evaluation.corpus import Queries, embed_corpus, embed_queries
from trainer.evaluation.exclusion import (
    columns_for,
    earlier_splits,
    engaged_counts,
    excluded_pairs,
    user_item_lists,
)
from trainer.evaluation.funnel import funnel_metrics
from trainer.evaluation.intervals import BootstrapConfig, reduce_query_means
from trainer.evaluation.light_rerank import pad_columns, reranked_topk
from trainer.evaluation.metrics import (
    HEAD_FRACTION,
    MetricCutoffs,
    cold_items,
    per_query_metrics,
    row_count,
    tail_items,
)
from trainer.features import ResolvedFeatures
from trainer.mips import ItemLists, distributed_topk
from trainer.runtime.distributed import DistributedEnv
from trainer.runtime.run_files import METRICS_FILE

logger = logging.getLogger(__name__)

SUBSETS = ("tail", "cold")


def popularity_scores(train_pairs: pa.Table, num_items: int) -> np.ndarray:
    """[N] training interaction counts: the most-popular baseline's item scores."""
    items = train_pairs.column(ITEM_ID).to_numpy()
    return np.bincount(items, minlength=num_items).astype(np.float32)


def _coverage(top10: torch.Tensor, num_items: int, device: torch.device) -> float:
    seen = torch.zeros(num_items, dtype=torch.int32, device=device)
    valid = top10[top10 >= 0]
    seen[valid] = 1
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return float(seen.sum().item()) / num_items


def cutoffs_for(ks: Sequence[int]) -> MetricCutoffs:
    """HR@10, Recall@each K, NDCG@K for K <= 50, coverage@10, tail and cold Recall@each K."""
    return MetricCutoffs(
        hit_rate=(10,),
        recall=tuple(ks),
        ndcg=tuple(k for k in ks if k <= 50) or (min(ks),),
        coverage=(10,),
        tail_recall=tuple(ks),
        cold_recall=tuple(ks),
    )


def _score_ranking(
    topk_ids: torch.Tensor,
    targets: torch.Tensor,
    users: torch.Tensor,
    ks: Sequence[int],
    num_items: int,
    tail: torch.Tensor,
    cold: torch.Tensor,
    env: DistributedEnv,
    bootstrap: BootstrapConfig,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics over all ranks' queries and their intervals. Collective.

    Args:
        topk_ids: [q_r, K] this rank's ranked ids; targets, users: [q_r] int64 (users are
            the bootstrap's resampling unit).
        tail: [num_items] bool long-tail mask, the same on every rank.
        cold: [num_items] bool cold-item mask, the same on every rank.
    Returns:
        ({metric: mean over every rank's queries, ``<subset>_rows``: their counts,
        ``coverage@10``}, {metric: [low, high]} for the per-query metrics).
    """
    per_query = per_query_metrics(
        topk_ids.cpu(), targets.cpu(), cutoffs_for(ks), tail.cpu(), cold.cpu()
    )
    means, intervals = reduce_query_means(per_query, users.cpu(), bootstrap, env.device)
    rows = torch.tensor([row_count(per_query, s) for s in SUBSETS], device=env.device)
    dist.all_reduce(rows)
    means |= {f"{s}_rows": int(n) for s, n in zip(SUBSETS, rows.tolist(), strict=True)}
    means["coverage@10"] = _coverage(topk_ids[:, :10], num_items, env.device)
    return means, intervals


@dataclass(frozen=True)
class _Exclusion:
    """The evaluation's exclusion lists and popularity counts for this rank's queries."""

    lists: ItemLists
    engaged_counts: np.ndarray  # [N] the most-popular baseline's scores
    event_counts: np.ndarray  # [N] training events per item (tail and cold masks)


def _exclusion(
    config: ExperimentConfig, manifest: Manifest, split: str, queries: Queries, rule: ExcludeRule
) -> _Exclusion:
    weights = config.loss.label_weights
    columns = columns_for(ExcludeRule.ENGAGED, manifest.schema.labels)
    train = read_split_columns(config.data.path, manifest, config.data.train_split, columns)
    num_items = manifest.tables["item_id"]
    earlier = [
        train
        if name == config.data.train_split
        else read_split_columns(config.data.path, manifest, name, columns)
        for name in earlier_splits(split, config.data.train_split)
    ]
    events = pa.concat_tables(earlier) if earlier else train.slice(0, 0)
    own = read_split_columns(config.data.path, manifest, split, columns)
    lists = user_item_lists(
        excluded_pairs(events, rule, weights),
        queries.users.cpu().numpy(),
        excluded_pairs(own, rule, weights),
        queries.times.cpu().numpy(),
    )
    return _Exclusion(
        lists=lists,
        engaged_counts=engaged_counts(train, num_items, weights),
        event_counts=popularity_scores(train.select([USER_ID, ITEM_ID]), num_items),
    )


def protocol(config: ExperimentConfig, split: str, num_items: int, queries: int) -> dict[str, Any]:
    """What an evaluation measured, beside its numbers (``metrics.json`` ``protocol``)."""
    return {
        "split": split,
        "exclude": config.eval.exclude.value,
        "corpus_items": num_items,
        "queries": queries,
        "cutoffs": list(config.eval.ks),
        "interval": f"{config.eval.interval_level:.0%} interval, percentile bootstrap over users "
        f"({config.eval.bootstrap_replicates} replicates)",
    }


def protocol_line(info: dict[str, Any]) -> str:
    """One line: split, exclusion rule, corpus size, queries, cutoffs, interval."""
    cutoffs = ",".join(str(k) for k in info["cutoffs"])
    return (
        f"protocol: split={info['split']} exclude={info['exclude']} "
        f"corpus={info['corpus_items']} items queries={info['queries']} K={cutoffs} "
        f"interval={info['interval']}"
    )


def evaluate_model(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    run_dir: Path | None,
    split: str | None = None,
    *,
    output_name: str = METRICS_FILE,
    bootstrap: BootstrapConfig | None = None,
    checkpoint: str | None = None,
    features: ResolvedFeatures | None = None,
) -> dict[str, Any]:
    """Collective. Writes ``run_dir / output_name`` (rank 0; nothing when ``run_dir`` is None)
    and returns {model, popularity, intervals, protocol, num_queries, ...}; with the light
    ranking head also ``reranked``: the metrics of ``model.light_head.num_items`` items
    reranked by the head out of ``num_knn_items`` retrieved (cutoffs beyond num_items count
    only those items). ``checkpoint`` names the evaluated weights' folder (``step-N``, ``best``).
    ``bootstrap`` defaults to ``eval.bootstrap_replicates`` at ``eval.interval_level``, seeded
    by ``seed``. ``features``: the job's resolved features (resolved here when None)."""
    split = split or config.eval.split
    eval_config = config.eval
    bootstrap = bootstrap or BootstrapConfig(
        eval_config.bootstrap_replicates, eval_config.interval_level, config.seed
    )
    model.eval()
    num_items = manifest.tables["item_id"]
    corpus = embed_corpus(model, manifest, config, env, features)
    queries = embed_queries(model, manifest, config, env, split, features)
    exclusion = _exclusion(config, manifest, split, queries, config.eval.exclude)
    tail = torch.from_numpy(tail_items(exclusion.event_counts, HEAD_FRACTION))
    cold = torch.from_numpy(cold_items(exclusion.event_counts, config.eval.cold_item_max_events))
    results = _header(config, split, num_items, _query_count(queries, env), checkpoint)
    score = functools.partial(
        _score_ranking,
        targets=queries.targets,
        users=queries.users,
        ks=config.eval.ks,
        num_items=num_items,
        tail=tail,
        cold=cold,
        env=env,
        bootstrap=bootstrap,
    )

    for name, topk_ids in _rankings(model, manifest, config, env, corpus, queries, exclusion):
        results[name], results["intervals"][name] = score(topk_ids)
    # The same model and baseline under further rules (a repeat-consumption feed reports the
    # discovery of new items beside it); the table and the protocol keep eval.exclude.
    results["by_exclusion"] = {
        rule.value: _scored_under(rule, score, model, manifest, config, env, corpus, queries, split)
        for rule in config.eval.also_exclude
    }
    if config.eval.funnel.ranker is not None:
        results["funnel"] = funnel_metrics(model, manifest, config, env, split, features)
    if env.is_main:
        _report(results, config, run_dir, output_name)
    model.train()
    return results


def _query_count(queries: Queries, env: DistributedEnv) -> int:
    """The queries of every rank (collective)."""
    count = torch.tensor([len(queries.targets)], device=env.device)
    dist.all_reduce(count)
    return int(count.item())


def _header(
    config: ExperimentConfig, split: str, num_items: int, num_queries: int, checkpoint: str | None
) -> dict[str, Any]:
    """What was evaluated and how: the leading entries of metrics.json."""
    return {
        "split": split,
        "num_items": num_items,
        "num_queries": num_queries,
        "head_fraction": HEAD_FRACTION,
        "cold_item_max_events": config.eval.cold_item_max_events,
        "intervals": {},
        "checkpoint": checkpoint,
        "protocol": protocol(config, split, num_items, num_queries),
    }


def _scored_under(
    rule: ExcludeRule,
    score: Callable[[torch.Tensor], tuple[dict[str, float], dict[str, list[float]]]],
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    corpus: tuple[torch.Tensor, torch.Tensor],
    queries: Queries,
    split: str,
) -> dict[str, Any]:
    """{model, popularity, intervals} of the model and most-popular under ``rule``."""
    exclusion = _exclusion(config, manifest, split, queries, rule)
    entry: dict[str, Any] = {"intervals": {}}
    for name, topk_ids in _rankings(
        model, manifest, config, env, corpus, queries, exclusion, head=False
    ):
        entry[name], entry["intervals"][name] = score(topk_ids)
    return entry


def _rankings(
    model: torch.nn.Module,
    manifest: Manifest,
    config: ExperimentConfig,
    env: DistributedEnv,
    corpus: tuple[torch.Tensor, torch.Tensor],
    queries: Queries,
    exclusion: _Exclusion,
    head: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's top-K ids [q_r, K]) of every ranking evaluated (collective): the
    model, the light head's rerank (with the head, unless ``head`` is False), most-popular;
    one exclusion for all."""
    corpus_ids, corpus_embeddings = corpus
    k = max(config.eval.ks)
    _, topk_ids = distributed_topk(
        queries.embeddings,
        corpus_embeddings,
        corpus_ids,
        k,
        exclude=exclusion.lists,
        query_chunk=config.eval.query_chunk,
        corpus_chunk=config.eval.corpus_chunk,
    )
    yield "model", topk_ids
    light_head = head_module(model) if head else None
    if light_head is not None and queries.ranker is not None:
        weights = label_weights(manifest, config)
        _, reranked = reranked_topk(
            light_head,
            queries.embeddings,
            queries.ranker,
            corpus_ids,
            corpus_embeddings,
            weights,
            config,
            exclusion.lists,
        )
        yield "reranked", pad_columns(reranked, k)
    popularity = torch.from_numpy(exclusion.engaged_counts)
    _, pop_ids = distributed_topk(
        torch.ones(len(queries.targets), 1, device=env.device),
        popularity[corpus_ids.cpu()].unsqueeze(1).to(env.device),
        corpus_ids,
        k,
        exclude=exclusion.lists,
    )
    yield "popularity", pop_ids


def _report(
    results: dict[str, Any], config: ExperimentConfig, run_dir: Path | None, output_name: str
) -> None:
    """Rank 0: the results file and the table (at debug level without a run directory, as
    during validation)."""
    if results["model"]["cold_rows"] == 0 and run_dir is not None:
        logger.warning(
            "no %s query has a cold target (fewer than %d training events): cold_recall@K is NaN",
            results["split"],
            config.eval.cold_item_max_events,
        )
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / output_name).write_text(json.dumps(results, indent=2, sort_keys=True))
    level = logging.INFO if run_dir is not None else logging.DEBUG
    logger.log(level, "evaluation on %s:\n%s", results["split"], format_table(results))


# Rows that count queries rather than measure the ranking: shown below the table, not in it.
COUNT_ROWS = ("tail_rows", "cold_rows", "tail_queries", "cold_queries")


def format_table(results: dict[str, Any]) -> str:
    """Metric rows with 95% intervals, model vs. most-popular baseline (and the light head's
    reranked list), then the query counts and the protocol line."""
    rankings = [r for r in ("model", "popularity", "reranked") if r in results]
    titles = {"model": "two-tower", "popularity": "most-popular", "reranked": "reranked"}
    intervals = results.get("intervals", {})
    header = f"{'metric':<18}" + "".join(f"{titles[r]:>26}" for r in rankings) + f"{'ratio':>8}"
    lines = [header]
    for name in (n for n in results["model"] if n not in COUNT_ROWS):
        cells = [_cell(results[r].get(name), intervals.get(r, {}).get(name)) for r in rankings]
        ours, base = results["model"][name], results["popularity"].get(name)
        ratio = f"{ours / base:.2f}" if base and math.isfinite(base) else "—"
        lines.append(f"{name:<18}" + "".join(f"{c:>26}" for c in cells) + f"{ratio:>8}")
    model = results["model"]
    lines.append(
        "queries with a tail target: "
        f"{model.get('tail_rows', 0)}, with a cold target: {model.get('cold_rows', 0)}"
    )
    lines.append(protocol_line(results["protocol"]))
    if "funnel" in results:
        lines.append("funnel consistency against the ranker:")
        lines += [f"  {name:<22}{value:>10.4f}" for name, value in results["funnel"].items()]
    return "\n".join(lines)


def _cell(value: float | None, interval: list[float] | None) -> str:
    """``0.1234 [0.1100, 0.1380]``; the interval is omitted where there is none."""
    if value is None:
        return "—"
    if not interval or any(math.isnan(x) for x in interval):
        return f"{value:.4f}"
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"
