"""The experiment file of ``twotower sweep``: its typed schema, loading and checks."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from config import ConfigError
from trainer.runtime.run_files import (
    ALIGN_SUMMARY_FILE,
    TRAIN_SUMMARY_FILE,
)

# Set by the sweep on every run; experiment files may not set them.
SWEEP_OWNED = (
    "run.dir",
    "logging.wandb",
    "train.progress_bar",
    "ranker.train.progress_bar",
    "alignment.train.progress_bar",
    "eval.at_end",
)
# Shared by every variant of a dataset: a dataset's overrides may set it, a variant's may not.
DATASET_OWNED = ("seed",)
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Stage(enum.Enum):
    """What a variant runs: ``train`` a retrieval model, or ``align`` one (``trainer.align``)
    starting from the run of an earlier variant (``start``)."""

    TRAIN = "train"
    ALIGN = "align"


STAGE_MODULES = {Stage.TRAIN: "trainer.train", Stage.ALIGN: "trainer.align"}
STAGE_SUMMARIES = {Stage.TRAIN: TRAIN_SUMMARY_FILE, Stage.ALIGN: ALIGN_SUMMARY_FILE}
RANKER_MODULE = "trainer.ranker_train"
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
