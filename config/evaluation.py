"""The ``eval`` section: the split, cutoffs, exclusion rule, intervals, validation during
training with early stopping, and funnel metrics."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from config.errors import Fail


class ExcludeRule(enum.Enum):
    """Items an evaluation query may not be recommended (``trainer.evaluation.exclusion``); never
    depends on the query's target."""

    ENGAGED = "engaged"  # earlier events with positive net user value
    ALL_SHOWN = "all_shown"  # every earlier event, impressions included
    NONE = "none"  # nothing: repeat consumption is allowed


@dataclass
class FunnelConfig:
    """Funnel consistency against a ranker (``trainer.evaluation.funnel``): off while ``ranker`` is null.

    ``ranker``: a ranker run directory or checkpoint; ``ks``: overlap / NDCG cutoffs K;
    ``retrieve_n``: N, how many items retrieval passes on; ``max_queries``: eval rows scored
    against the whole corpus (a fixed sample)."""

    ranker: str | None = None
    ks: list[int] = field(default_factory=lambda: [10, 50])
    retrieve_n: int = 100
    max_queries: int = 1000


@dataclass
class EarlyStoppingConfig:
    """Which validation metric picks the best checkpoint, and when training stops for want of
    progress: after ``patience`` validations in a row without a gain above ``min_delta``
    (null: never early; the best checkpoint is kept all the same)."""

    metric: str = "ndcg@10"
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class EvalConfig:
    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [10, 50, 100])
    # The user's earlier items excluded from every query's ranking, whatever its target.
    exclude: ExcludeRule = ExcludeRule.ENGAGED
    # Further rules the model and most-popular are also scored under (metrics.json by_exclusion).
    also_exclude: list[ExcludeRule] = field(default_factory=list)
    # Percentile bootstrap over queries (Poisson weights) behind each metric's interval.
    bootstrap_replicates: int = 1000
    interval_level: float = 0.95
    # Validation during training on ``valid_split`` every N steps and/or at each epoch's end
    # (off while both are unset); the best is kept as checkpoints/best and is what the final
    # evaluation, ``twotower eval`` and ``twotower export`` use.
    every_n_steps: int | None = None
    every_epoch: bool = False
    valid_split: str = "valid"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    at_end: bool = True
    query_chunk: int = 1024
    corpus_chunk: int = 8192
    # Cold Recall@K counts the eval rows whose target has fewer training events than this.
    cold_item_max_events: int = 5
    funnel: FunnelConfig = field(default_factory=FunnelConfig)


def validate_eval(eval_config: EvalConfig, fail: Fail) -> None:
    if not eval_config.ks or min(eval_config.ks) < 1:
        fail("eval.ks", "must list positive cutoffs")
    if eval_config.cold_item_max_events < 1:
        fail(
            "eval.cold_item_max_events", "must be >= 1 (items with fewer training events are cold)"
        )
    if eval_config.bootstrap_replicates < 0:
        fail("eval.bootstrap_replicates", "must be >= 0 (0: no intervals)")
    if not 0 < eval_config.interval_level < 1:
        fail("eval.interval_level", "must be in (0, 1)")
    if eval_config.every_n_steps is not None and eval_config.every_n_steps < 1:
        fail("eval.every_n_steps", "must be >= 1 or null")
    stopping = eval_config.early_stopping
    if stopping.patience is not None and stopping.patience < 1:
        fail("eval.early_stopping.patience", "must be >= 1 or null")
    if stopping.min_delta < 0:
        fail("eval.early_stopping.min_delta", "must be >= 0")
    funnel = eval_config.funnel
    if not funnel.ks or min(funnel.ks) < 1 or max(funnel.ks) > funnel.retrieve_n:
        fail(
            "eval.funnel.ks",
            f"must list cutoffs in [1, eval.funnel.retrieve_n={funnel.retrieve_n}]",
        )
    if funnel.max_queries < 1:
        fail("eval.funnel.max_queries", "must be >= 1")
