"""The comparison tables of a sweep (markdown) and its results.json."""

from __future__ import annotations

import enum
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.sweep.plan import RunOutcome, RunStatus

BASELINE_ROW = "most-popular"
MISSING_CELL = "—"


class Source(enum.Enum):
    """Where a table column's value is read from."""

    EVAL = "eval"  # the ranking's entry of metrics.json ("model" or "popularity")
    TRAIN = "train"  # train_summary.json (no value for the baseline)
    FUNNEL = "funnel"  # metrics.json "funnel" (against the dataset's ranker; model rows only)
    # metrics.json "by_exclusion": the same ranking under an eval.also_exclude rule ("rule:key")
    EXCLUSION = "exclusion"


@dataclass(frozen=True)
class Column:
    title: str
    source: Source
    key: str
    format: str = ".4f"


# The one place that maps table columns to the keys evaluation and training write.
COLUMNS = (
    Column("Recall@10", Source.EVAL, "recall@10"),
    Column("Recall@50", Source.EVAL, "recall@50"),
    Column("Recall@100", Source.EVAL, "recall@100"),
    Column("NDCG@10", Source.EVAL, "ndcg@10"),
    Column("HR@10", Source.EVAL, "hr@10"),
    Column("tail Recall@50", Source.EVAL, "tail_recall@50"),
    Column("cold Recall@50", Source.EVAL, "cold_recall@50"),
    Column("coverage@10", Source.EVAL, "coverage@10"),
    Column("samples/s", Source.TRAIN, "samples_per_second", ",.0f"),
    # Shown only when some run measured them (a dataset with a ranker; truth: synthetic worlds).
    Column("ranker top-10 in top-100", Source.FUNNEL, "overlap@10"),
    Column("NDCG@10 vs ranker", Source.FUNNEL, "ranker_ndcg@10"),
    Column("NDCG@10 vs truth", Source.FUNNEL, "truth_ndcg@10"),
    # Shown only when some run was also scored under eval.also_exclude=[engaged].
    Column("HR@10, engaged excluded", Source.EXCLUSION, "engaged:hr@10"),
    Column("NDCG@10, engaged excluded", Source.EXCLUSION, "engaged:ndcg@10"),
    Column("Recall@100, engaged excluded", Source.EXCLUSION, "engaged:recall@100"),
)


def results_table(outcomes: Sequence[RunOutcome]) -> str:
    """Markdown table: one row per variant (a single run's value with its 95% bootstrap
    interval, or mean ± standard deviation over its seeds when it ran with several; a light
    head's reranked list as its own row), then the most-popular baseline (taken from the first
    successful run; every variant of a dataset evaluates the same queries). A variant below
    the most-popular baseline or below a random ranking on Recall@100 is flagged as a
    collapsed run, not a result, in a list under the table. Runs outside the table (a dataset's ranker) are skipped."""
    outcomes = [o for o in outcomes if o.run.in_table]
    optional = (Source.FUNNEL, Source.EXCLUSION)
    columns = [c for c in COLUMNS if c.source not in optional or _measured(outcomes, c)]
    header = ["variant", *(column.title for column in columns)]
    lines = [_row(header), "|---|" + "---:|" * len(columns)]
    flags: list[str] = []
    groups: dict[str, list[RunOutcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.run.variant, []).append(outcome)
    for variant, group in groups.items():
        failed = [o for o in group if o.status is not RunStatus.OK]
        if failed:
            failure = f"**failed** ({failed[0].error}): `{failed[0].run.log_path}`"
            lines.append(_row([variant, failure, *[""] * (len(columns) - 1)]))
            continue
        flag = collapse_flag(group[0].metrics)
        if flag:
            flags.append(f"- **{variant}**: {flag}")
        lines.append(_row([variant, *(_cell(group, c, "model") for c in columns)]))
        if all("reranked" in o.metrics for o in group):
            cells = [_cell(group, c, "reranked") for c in columns]
            lines.append(_row([f"{variant} (reranked by the light head)", *cells]))
    done = [o for o in outcomes if o.status is RunStatus.OK]
    if done:
        lines.append(_row([BASELINE_ROW, *(_cell(done[:1], c, "popularity") for c in columns)]))
    if flags:
        lines += ["", "Flagged (not a result to compare; see the run's log):", *flags]
    return "\n".join(lines)


# The cutoff a collapsed run is recognised at: below most-popular, or below random, there.
COLLAPSE_METRIC, COLLAPSE_K = "recall@100", 100


def collapse_flag(metrics: dict[str, Any]) -> str:
    """Why a variant is flagged under the table: ``collapsed: ...`` when its Recall@100 is below
    a random ranking's (K / corpus size), ``below most-popular: ...`` when below the
    most-popular baseline's; empty otherwise or when not measured."""
    ours = metrics.get("model", {}).get(COLLAPSE_METRIC)
    if ours is None:
        return ""
    corpus = metrics.get("num_items")
    if corpus and ours < COLLAPSE_K / corpus:
        return f"collapsed: {COLLAPSE_METRIC} {ours:.4f} below random ({COLLAPSE_K / corpus:.4f})"
    popular = metrics.get("popularity", {}).get(COLLAPSE_METRIC)
    if popular is not None and ours < popular:
        return f"below most-popular: {COLLAPSE_METRIC} {ours:.4f} < {popular:.4f}"
    return ""


def protocol_note(outcomes: Sequence[RunOutcome]) -> str:
    """The evaluation protocol of the table's runs (the first successful run's), as a line."""
    for outcome in outcomes:
        protocol = outcome.metrics.get("protocol") if outcome.status is RunStatus.OK else None
        if protocol:
            cutoffs = ", ".join(str(k) for k in protocol["cutoffs"])
            return (
                f"Protocol: split `{protocol['split']}`, exclusion `{protocol['exclude']}`, "
                f"{protocol['corpus_items']:,} corpus items, {protocol['queries']:,} queries, "
                f"K = {cutoffs}; brackets: {protocol['interval']}; a run that validated reports "
                "the test metrics of its best checkpoint on validation.\n\n"
            )
    return ""


def _measured(outcomes: Sequence[RunOutcome], column: Column) -> bool:
    if column.source is Source.EXCLUSION:
        rule, _, key = column.key.partition(":")
        return any(
            key in o.metrics.get("by_exclusion", {}).get(rule, {}).get("model", {})
            for o in outcomes
        )
    return any(column.key in o.metrics.get("funnel", {}) for o in outcomes)


def _ranking_metrics(metrics: dict[str, Any], column: Column) -> tuple[dict[str, Any], str]:
    """(the metrics.json part a ``Source.EVAL`` or ``Source.EXCLUSION`` column reads, its key)."""
    if column.source is Source.EXCLUSION:
        rule, _, key = column.key.partition(":")
        return metrics.get("by_exclusion", {}).get(rule, {}), key
    return metrics, column.key


def _cell(group: Sequence[RunOutcome], column: Column, ranking: str) -> str:
    """One value with its interval (when the run has one), or ``mean ± std`` (sample standard
    deviation) over a variant's seeds."""
    values = []
    for outcome in group:
        if column.source is Source.TRAIN:
            value = outcome.summary.get(column.key) if ranking == "model" else None
        elif column.source is Source.FUNNEL:
            value = (
                outcome.metrics.get("funnel", {}).get(column.key) if ranking == "model" else None
            )
        else:
            part, key = _ranking_metrics(outcome.metrics, column)
            value = part.get(ranking, {}).get(key)
        if value is None:
            return MISSING_CELL
        values.append(float(value))
    if len(values) == 1:
        part, key = _ranking_metrics(group[0].metrics, column)
        interval = part.get("intervals", {}).get(ranking, {}).get(key)
        if interval and not any(map(math.isnan, interval)):
            low, high = (format(x, column.format) for x in interval)
            return f"{format(values[0], column.format)} [{low}, {high}]"
        return format(values[0], column.format)
    mean, spread = statistics.mean(values), statistics.stdev(values)
    return f"{format(mean, column.format)} ± {format(spread, column.format)}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def write_results(dataset_dir: Path, title: str, outcomes: Sequence[RunOutcome]) -> None:
    """``results.md`` (heading, base config, table) and ``results.json`` under ``dataset_dir``."""
    first = next((o.run for o in outcomes if o.run.in_table), outcomes[0].run)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    heading = (
        f"# {title}: {first.dataset}\n\n"
        f"Base config `{first.config}`, seeds {sorted({o.run.seed for o in outcomes})}; each "
        "run's overrides and log are in "
        "results.json.\n\n"
        f"{protocol_note(outcomes)}"
    )
    (dataset_dir / "results.md").write_text(heading + results_table(outcomes) + "\n")
    done = [o for o in outcomes if o.status is RunStatus.OK and o.run.in_table]
    document = {
        "title": title,
        "dataset": first.dataset,
        "config": first.config,
        "seeds": sorted({o.run.seed for o in outcomes}),
        "popularity": done[0].metrics.get("popularity", {}) if done else {},
        "variants": [_outcome_record(o) for o in outcomes],
    }
    (dataset_dir / "results.json").write_text(json.dumps(document, indent=2))


def _outcome_record(outcome: RunOutcome) -> dict[str, Any]:
    run = outcome.run
    return {
        "name": run.variant,
        "status": outcome.status.value,
        "error": outcome.error,
        "failure_line": outcome.failure_line,
        "run_dir": str(run.run_dir),
        "log": str(run.log_path),
        "command": outcome.command,
        "seconds": round(outcome.seconds, 1),
        "metrics": outcome.metrics,
        "train": outcome.summary,
    }
