"""Jobs that start from a trained retrieval run (alignment, its reference) rebuild that run's
model from the run's own saved config, not from the job's config file.

The start run's ``config.yaml`` is the resolved config it trained with; its model-defining keys
(``model.*``, ``features.*`` and the data keys that shape the batch, :data:`MODEL_DATA_KEYS`)
replace the job's. The job's config says only what the job itself needs (its own section,
``run``, ``checkpoint``, ``eval``, batch sizes). A model-defining key the job's config sets to a
value other than both the default and the start run's is a real mismatch: a ``ConfigError``
names every such key with both values.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from config import ConfigError, ExperimentConfig, load_config, to_dict
from trainer.runtime.checkpoint import COMPLETE
from trainer.runtime.run_files import CHECKPOINTS_DIR, CONFIG_FILE

MODEL_SECTIONS = ("model", "features")
MODEL_DATA_KEYS = ("path", "recent_history", "id_policy")


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run directory, or of one of its checkpoint folders.

    Raises:
        ConfigError: ``path`` is neither (names it).
    """
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    if (path / COMPLETE).exists() and path.parent.name == CHECKPOINTS_DIR:
        return path.parent.parent
    raise ConfigError(
        f"{path}: neither a run directory (no {CONFIG_FILE}) nor a checkpoint folder of one"
    )


def _flat(section: Any, prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    items = section.items() if isinstance(section, dict) else ()
    for key, value in items:
        name = f"{prefix}.{key}"
        if isinstance(value, dict) and value:
            flat.update(_flat(value, name))
        else:
            flat[name] = value
    return flat


def _model_keys(config: ExperimentConfig) -> dict[str, Any]:
    document = to_dict(config)
    keys: dict[str, Any] = {}
    for section in MODEL_SECTIONS:
        keys.update(_flat(document[section], section))
    for key in MODEL_DATA_KEYS:
        keys[f"data.{key}"] = document["data"][key]
    if keys["data.path"] is not None:
        keys["data.path"] = str(Path(keys["data.path"]).resolve())
    return keys


def model_mismatches(job: ExperimentConfig, start: ExperimentConfig) -> list[str]:
    """``key: job value vs start value`` for every model-defining key the job's config changed
    from the default to something other than the start run's value."""
    defaults, wanted, trained = (
        _model_keys(ExperimentConfig()),
        _model_keys(job),
        _model_keys(start),
    )
    return [
        f"{key}: {wanted.get(key)!r} here, {trained.get(key)!r} in the start run"
        for key in sorted(set(wanted) | set(trained))
        if wanted.get(key) != defaults.get(key) and wanted.get(key) != trained.get(key)
    ]


def with_start_model(job: ExperimentConfig, start: str | Path, key: str) -> ExperimentConfig:
    """``job`` with the model-defining keys of the run at ``start`` (its config.yaml).

    Args:
        start: the start run's directory or one of its checkpoint folders.
        key: the config key that named ``start`` (for errors).
    Raises:
        ConfigError: ``start`` is no run, or the job's config contradicts it (names the keys).
    """
    try:
        run_dir = run_dir_of(start)
    except ConfigError as error:
        raise ConfigError(f"config key '{key}': {error}") from error
    trained = load_config(run_dir / CONFIG_FILE)
    mismatches = model_mismatches(job, trained)
    if mismatches:
        raise ConfigError(
            f"config key '{key}': the start run {run_dir} was trained with another model; "
            "leave these keys out of the job's config (the start run's are used) or match "
            "them:\n  " + "\n  ".join(mismatches)
        )
    data = replace(
        job.data,
        path=trained.data.path,
        recent_history=trained.data.recent_history,
        id_policy=trained.data.id_policy,
    )
    return replace(job, model=trained.model, features=trained.features, data=data)
