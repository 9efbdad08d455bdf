"""``twotower sweep EXPERIMENTS.yaml``: an ablation harness. Every variant of an experiment file is
trained on every dataset with the dataset's seed and budget, then compared in one table per dataset.

Experiment file (YAML; unknown keys, wrong types and missing values are errors naming the key)::

    title: Negatives and loss families    # heading of the result tables
    out: runs/sweeps/negatives            # <out>/<dataset>/<variant-slug>/ is one run's run.dir
    datasets:                             # name (a directory name) -> base config of its runs
      ml-100k:
        config: configs/movielens_100k.yaml
        overrides: [train.epochs=10]      # the budget: applied to every variant of this dataset
    variants:                             # in table order; applied after the dataset's overrides
      - name: in-batch softmax
        overrides: []
      - name: + logQ
        overrides: [negatives.log_q.enabled=true]

Funnel experiments add a ranker per dataset and alignment stages::

    datasets:
      ml-100k:
        config: configs/movielens_100k.yaml
        ranker: {config: configs/ranker_movielens_100k.yaml, overrides: [train.epochs=2]}
    variants:
      - name: base
      - name: + KD
        overrides: [distillation.listwise.teacher={ranker}]   # {ranker}: its run directory
      - name: + reward alignment
        stage: align                  # python -m trainer.align, starting from ...
        start: base                   # ... this earlier variant's run (same seed)

The ranker trains first (``<out>/<dataset>/ranker``, not a table row); every variant then also
reports funnel consistency against it (``eval.funnel.ranker``: overlap@10, NDCG vs the ranker, and
vs the truth on synthetic worlds), and an ``align`` variant gets ``checkpoint.resume_from`` and
``alignment.reward_checkpoint`` set. A light ranking head's reranked list is its own row.

Paths are relative to the working directory, like the paths inside configs. One run is
``python -m trainer.train CONFIG <dataset overrides> <variant overrides> run.dir=... logging.wandb=false
train.progress_bar=false eval.at_end=true`` (under torchrun for ``--nproc`` > 1), its output in
``<run.dir>/train.log``. Variants may not set ``seed`` (the comparison needs one seed) nor the keys
the sweep sets itself. Every run's full configuration is loaded and validated before the first run
starts, so a typo in the last variant fails at once, naming the variant and the key. A run that
fails is reported as failed in its table (with its log) and the sweep goes on; the exit status is
then 1.

Results: ``<out>/<dataset>/results.md`` (the table) and ``results.json`` (every metric of every
variant, the train summaries, the commands), rewritten after each run.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from config import ConfigError, load_config
from launch.local import torchrun_command
from trainer.checkpoint import checkpoints_root
from trainer.run_files import ALIGN_SUMMARY_FILE, LOG_FILE, METRICS_FILE, TRAIN_SUMMARY_FILE

logger = logging.getLogger(__name__)

BASELINE_ROW = "most-popular"
MISSING_CELL = "—"

# Set by the sweep on every run; experiment files may not set them.
SWEEP_OWNED = ("run.dir", "logging.wandb", "train.progress_bar", "eval.at_end")
# Shared by every variant of a dataset: a dataset's overrides may set it, a variant's may not.
DATASET_OWNED = ("seed",)
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# "[rank0]: data_pipeline.schema.SchemaError: ..." or "ValueError: ..." in a traceback.
EXCEPTION_LINE = re.compile(r"(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt|Exit)\b.*:")


class Stage(enum.Enum):
    """What a variant runs: ``train`` a retrieval model, or ``align`` one (``trainer.align``)
    starting from the run of an earlier variant (``start``)."""

    TRAIN = "train"
    ALIGN = "align"


STAGE_MODULES = {Stage.TRAIN: "trainer.train", Stage.ALIGN: "trainer.align"}
STAGE_SUMMARIES = {Stage.TRAIN: TRAIN_SUMMARY_FILE, Stage.ALIGN: ALIGN_SUMMARY_FILE}
RANKER_MODULE, RANKER_METRICS = "trainer.ranker_train", "ranker_metrics.json"
RANKER_PLACEHOLDER = "{ranker}"


@dataclass
class RankerSpec:
    """A ranking model trained once per dataset before its variants (``twotower train-ranker``):
    every variant then reports funnel consistency against it, and ``{ranker}`` in a variant's
    overrides (a teacher, a reward model) is its run directory."""

    config: str = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class DatasetSpec:
    """One dataset of a sweep: its base config file and the overrides every variant shares."""

    config: str = MISSING
    overrides: list[str] = field(default_factory=list)
    ranker: RankerSpec | None = None


@dataclass
class VariantSpec:
    """One row of the comparison: a name and the overrides that make it differ.

    ``datasets`` limits it to the named datasets (empty: every dataset), e.g. impression hard
    negatives only where the data logs impressions."""

    name: str = MISSING
    overrides: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    stage: Stage = Stage.TRAIN
    start: str | None = None  # align: the earlier variant whose run is the start checkpoint


@dataclass
class SweepSpec:
    """A whole experiment file."""

    title: str = MISSING
    out: str = MISSING
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    variants: list[VariantSpec] = field(default_factory=list)
    # Every (dataset, variant) runs once per seed and the table shows mean ± standard deviation;
    # empty: once, with the base config's seed.
    seeds: list[int] = field(default_factory=list)


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


# ---------------------------------------------------------------- experiment file


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate an experiment file.

    Raises:
        ConfigError: naming the file and the key (``variants[2].overrides``) at fault.
    """
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{source}: expected a mapping with keys title, out, datasets, variants")
    for key, kind, noun in (("datasets", DictConfig, "mapping"), ("variants", ListConfig, "list")):
        if key in raw and not isinstance(raw[key], kind):
            raise ConfigError(f"{source}: key '{key}': expected a {noun}")
    # Variants one by one first: OmegaConf's key paths stop at list items.
    for index, item in enumerate(raw.get("variants", [])):
        _structured(VariantSpec, item, source, f"variants[{index}]")
    spec = _structured(SweepSpec, raw, source, "")
    _validate(spec, source)
    return spec


Spec = TypeVar("Spec")


def _structured(schema: type[Spec], node: Any, source: str, prefix: str) -> Spec:
    try:
        result = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except (OmegaConfBaseException, TypeError, ValueError) as error:
        key = str(getattr(error, "full_key", "") or "")
        where = ".".join(part for part in (prefix, key) if part) or "<top level>"
        message = str(error).splitlines()[0]
        raise ConfigError(f"{source}: key '{where}': {message}") from error
    assert isinstance(result, schema)
    return result


def _validate(spec: SweepSpec, source: str) -> None:
    """Checks beyond types: names usable as directories, no run-owned keys in overrides."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: key '{key}': {message}")

    if not spec.datasets:
        fail("datasets", "name at least one dataset")
    if not spec.variants:
        fail("variants", "list at least one variant")
    if len(set(spec.seeds)) != len(spec.seeds):
        fail("seeds", f"{spec.seeds} repeats a seed")
    for name, dataset in spec.datasets.items():
        if not DATASET_NAME.fullmatch(name):
            fail(f"datasets.{name}", "a dataset name is a directory name: letters, digits, . _ -")
        for key in _override_keys(dataset.overrides):
            if key in SWEEP_OWNED:
                fail(f"datasets.{name}.overrides", f"'{key}' is set by the sweep")
            if spec.seeds and key in DATASET_OWNED:
                fail(f"datasets.{name}.overrides", f"'{key}' comes from the sweep's 'seeds'")
    slugs: dict[str, str] = {}
    for index, variant in enumerate(spec.variants):
        where = f"variants[{index}] ('{variant.name}')"
        slug = slugify(variant.name)
        if not slug:
            fail(f"variants[{index}].name", f"'{variant.name}' has no letters or digits")
        if slug in slugs:
            fail(
                f"variants[{index}].name",
                f"'{variant.name}' and '{slugs[slug]}' share the directory name '{slug}'",
            )
        slugs[slug] = variant.name
        unknown = sorted(set(variant.datasets) - set(spec.datasets))
        if unknown:
            fail(f"{where}.datasets", f"{unknown} are not among datasets {sorted(spec.datasets)}")
        for key in _override_keys(variant.overrides):
            if key in SWEEP_OWNED:
                fail(f"{where}.overrides", f"'{key}' is set by the sweep")
            if key in DATASET_OWNED:
                fail(
                    f"{where}.overrides",
                    f"variants share their dataset's '{key}'; set it in the dataset's overrides",
                )
        _validate_stage(spec, index, fail)


def _validate_stage(spec: SweepSpec, index: int, fail: Callable[[str, str], None]) -> None:
    """An align variant starts from an earlier train variant; ``{ranker}`` needs a ranker."""
    variant = spec.variants[index]
    where = f"variants[{index}] ('{variant.name}')"
    earlier = {v.name: v for v in spec.variants[:index]}
    if variant.stage is Stage.ALIGN:
        start = earlier.get(variant.start or "")
        if start is None or start.stage is not Stage.TRAIN:
            fail(f"{where}.start", "name an earlier variant of stage 'train' to align")
    elif variant.start is not None:
        fail(f"{where}.start", "only an 'align' variant starts from another variant")
    needs_ranker = variant.stage is Stage.ALIGN or any(
        RANKER_PLACEHOLDER in o for o in variant.overrides
    )
    if needs_ranker:
        names = variant.datasets or list(spec.datasets)
        missing = [n for n in names if spec.datasets[n].ranker is None]
        if missing:
            fail(f"{where}", f"needs a ranker, but datasets {missing} declare none ('ranker:')")


def _override_keys(overrides: Sequence[str]) -> list[str]:
    return [o.split("=", 1)[0].strip().lstrip("+~") for o in overrides]


def slugify(name: str) -> str:
    """Directory name of a variant: lower case, runs of other characters folded into '-'.

    ``"+ logQ"`` -> ``"logq"``, ``"temperature 0.1"`` -> ``"temperature-0.1"``.
    """
    return re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-._")


# ---------------------------------------------------------------- planning


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
        "train.progress_bar=false",
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
        metrics_file=RANKER_METRICS,
        summary_file=RANKER_METRICS,
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


# ---------------------------------------------------------------- running


def train_command(run: PlannedRun, nproc: int) -> list[str]:
    """The trainer's command line: a bare process for 1 rank, torchrun for more."""
    if nproc == 1:
        return [sys.executable, "-m", run.module, run.config, *run.overrides]
    return torchrun_command(nproc, run.config, list(run.overrides), module=run.module)


def execute(run: PlannedRun, nproc: int) -> RunOutcome:
    """Train one run in a subprocess (output to its train.log) and read what it wrote."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    # A result left by an earlier sweep must not pass for this run's, and its checkpoints must
    # not be resumed: the variant's config (or the data) may have changed since.
    for stale in (run.metrics_file, run.summary_file):
        (run.run_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(checkpoints_root(run.run_dir), ignore_errors=True)
    command = train_command(run, nproc)
    start = time.perf_counter()
    with run.log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    outcome = RunOutcome(run, RunStatus.OK, returncode, time.perf_counter() - start, command)
    metrics_path, summary_path = run.run_dir / run.metrics_file, run.run_dir / run.summary_file
    outcome.failure_line = failure_line(run.log_path.read_text(errors="replace"))
    if returncode != 0:
        outcome.status, outcome.error = RunStatus.FAILED, f"exit code {returncode}"
    elif not metrics_path.exists():
        outcome.status, outcome.error = RunStatus.FAILED, f"no {run.metrics_file} written"
    else:
        outcome.metrics = json.loads(metrics_path.read_text())
        if summary_path.exists():
            outcome.summary = json.loads(summary_path.read_text())
        else:
            logger.warning("%s: no %s; samples/s left empty", run.run_dir, run.summary_file)
    return outcome


def failure_line(log: str) -> str:
    """The log's last exception line (``SchemaError: ... no manifest``), else its last line;
    torchrun ends its logs with a summary banner, so the last line alone says little."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        # torchrun's own ChildFailedError only says that a rank failed; the rank says why.
        if EXCEPTION_LINE.match(line) and "ChildFailedError" not in line:
            return line
    return lines[-1] if lines else ""


@dataclass
class SweepReport:
    """The experiment's title, per dataset its markdown table, and the failed-run count."""

    title: str
    tables: dict[str, str]
    runs: int
    failed: int


def run_sweep(
    path: str | Path,
    datasets: Sequence[str] | None = None,
    nproc: int = 1,
    only: Sequence[str] | None = None,
) -> SweepReport:
    """Validate every run of the experiment file, then train them one after another."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    spec = load_sweep(path)
    runs = plan_sweep(spec, datasets, only)
    logger.info("sweep '%s': %d runs validated, writing to %s", spec.title, len(runs), spec.out)
    by_dataset: dict[str, list[RunOutcome]] = {}
    for number, run in enumerate(runs, start=1):
        logger.info(
            "[%d/%d] %s / %s (log: %s)", number, len(runs), run.dataset, run.variant, run.log_path
        )
        outcome = execute(run, nproc)
        if outcome.status is RunStatus.OK:
            logger.info("[%d/%d] done in %.0f s", number, len(runs), outcome.seconds)
        else:
            logger.error(
                "[%d/%d] failed (%s): %s\n  see %s",
                number,
                len(runs),
                outcome.error,
                outcome.failure_line,
                run.log_path,
            )
        outcomes = by_dataset.setdefault(run.dataset, [])
        outcomes.append(outcome)
        write_results(Path(spec.out) / run.dataset, spec.title, outcomes)
    tables = {name: results_table(outcomes) for name, outcomes in by_dataset.items()}
    failed = sum(o.status is RunStatus.FAILED for group in by_dataset.values() for o in group)
    return SweepReport(spec.title, tables, len(runs), failed)


# ---------------------------------------------------------------- results


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
