"""The runs of a sweep, each configuration loaded and validated before the first starts, and
what a run leaves behind."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from config import ConfigError, load_config
from launch.sweep.spec import (
    RANKER_MODULE,
    RANKER_PLACEHOLDER,
    STAGE_MODULES,
    STAGE_SUMMARIES,
    RankerSpec,
    Stage,
    SweepSpec,
    VariantSpec,
    slugify,
)
from trainer.runtime.run_files import (
    LOG_FILE,
    METRICS_FILE,
    RANKER_METRICS_FILE,
    TRAIN_SUMMARY_FILE,
)


@dataclass(frozen=True)
class PlannedRun:
    """One (dataset, variant) training run, its configuration already validated.

    ``overrides`` is everything after the config path on the trainer's command line.
    """

    dataset: str
    variant: str
    config: str
    overrides: tuple[str, ...]
    run_dir: Path
    seed: int
    module: str = "trainer.train"
    metrics_file: str = METRICS_FILE
    summary_file: str = TRAIN_SUMMARY_FILE
    in_table: bool = True  # False: a dataset's ranker, trained for the variants

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE


class RunStatus(enum.Enum):
    OK = "ok"
    FAILED = "failed"


@dataclass
class RunOutcome:
    """What one run left behind: ``metrics`` is its metrics.json, ``summary`` its
    train_summary.json (empty when absent); ``error`` says why a failed run failed."""

    run: PlannedRun
    status: RunStatus
    returncode: int
    seconds: float
    command: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    failure_line: str = ""  # see failure_line


def plan_sweep(
    spec: SweepSpec,
    datasets: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
) -> list[PlannedRun]:
    """The runs to make, dataset by dataset, each run's configuration loaded and validated.

    Args:
        datasets: dataset names to run (None: all).
        only: variant names or slugs to run (None: all), kept in file order.
    Raises:
        ConfigError: an unknown dataset or variant, or a run configuration that does not load
            (the message names the dataset, the variant and the config key).
    """
    chosen_datasets = _select(list(spec.datasets), datasets, "dataset", lambda n: n)
    chosen_variants = _select(spec.variants, only, "variant", lambda v: v.name)
    runs = []
    for dataset_name in chosen_datasets:
        dataset = spec.datasets[dataset_name]
        ranker_dir = Path(spec.out) / dataset_name / "ranker" if dataset.ranker else None
        if dataset.ranker is not None and ranker_dir is not None:
            runs.append(_plan_ranker(dataset_name, dataset.ranker, ranker_dir))
        seeds: list[int | None] = list(spec.seeds) or [None]
        for variant, seed in itertools.product(chosen_variants, seeds):
            if variant.datasets and dataset_name not in variant.datasets:
                continue
            run_dir = _variant_dir(spec, dataset_name, variant.name, seed)
            seeded: tuple[str, ...] = () if seed is None else (f"seed={seed}",)
            own = [o.replace(RANKER_PLACEHOLDER, str(ranker_dir)) for o in variant.overrides]
            overrides = (
                *dataset.overrides,
                *own,
                *_stage_overrides(spec, dataset_name, variant, seed, ranker_dir),
                *seeded,
                f"run.dir={run_dir}",
                "logging.wandb=false",
                "train.progress_bar=false",
                "alignment.train.progress_bar=false",
                "eval.at_end=true",
            )
            try:
                config = load_config(dataset.config, list(overrides))
            except ConfigError as error:
                raise ConfigError(
                    f"dataset '{dataset_name}', variant '{variant.name}': {error}"
                ) from error
            runs.append(
                PlannedRun(
                    dataset_name,
                    variant.name,
                    dataset.config,
                    overrides,
                    run_dir,
                    config.seed,
                    module=STAGE_MODULES[variant.stage],
                    summary_file=STAGE_SUMMARIES[variant.stage],
                )
            )
    return runs


def _variant_dir(spec: SweepSpec, dataset: str, variant: str, seed: int | None) -> Path:
    run_dir = Path(spec.out) / dataset / slugify(variant)
    return run_dir if seed is None else run_dir / f"seed-{seed}"


def _stage_overrides(
    spec: SweepSpec,
    dataset: str,
    variant: VariantSpec,
    seed: int | None,
    ranker_dir: Path | None,
) -> list[str]:
    """Funnel metrics against the dataset's ranker; an align variant's start and reward."""
    extra = [] if ranker_dir is None else [f"eval.funnel.ranker={ranker_dir}"]
    if variant.stage is Stage.ALIGN:
        assert variant.start is not None and ranker_dir is not None
        start = _variant_dir(spec, dataset, variant.start, seed)
        extra += [f"checkpoint.resume_from={start}", f"alignment.reward_checkpoint={ranker_dir}"]
    return extra


def _plan_ranker(dataset: str, ranker: RankerSpec, run_dir: Path) -> PlannedRun:
    overrides = (
        *ranker.overrides,
        f"run.dir={run_dir}",
        "logging.wandb=false",
        "ranker.train.progress_bar=false",
    )
    try:
        config = load_config(ranker.config, list(overrides))
    except ConfigError as error:
        raise ConfigError(f"dataset '{dataset}', ranker: {error}") from error
    return PlannedRun(
        dataset,
        "ranker",
        ranker.config,
        overrides,
        run_dir,
        config.seed,
        module=RANKER_MODULE,
        metrics_file=RANKER_METRICS_FILE,
        summary_file=RANKER_METRICS_FILE,
        in_table=False,
    )


T = TypeVar("T")


def _select(
    items: list[T], wanted: Sequence[str] | None, noun: str, name: Callable[[T], str]
) -> list[T]:
    """``items`` whose name (or its slug) is in ``wanted``, in their own order."""
    if not wanted:
        return items
    known = {key: item for item in items for key in (name(item), slugify(name(item)))}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        choices = ", ".join(repr(name(item)) for item in items)
        raise ConfigError(f"unknown {noun} {unknown[0]!r}; the experiment file has {choices}")
    picked = {id(known[w]) for w in wanted}
    return [item for item in items if id(item) in picked]
