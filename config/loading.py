"""Loading a YAML file with ``a.b=c`` overrides into a validated :class:`ExperimentConfig`,
and writing one back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from config.errors import ConfigError
from config.experiment import ExperimentConfig, validate


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load ``path`` (YAML) over the defaults, then apply ``a.b=c`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, bad enum value or inconsistent values; the message
            names the key and the file.
    """
    source = str(path) if path is not None else "<defaults>"
    try:
        merged = OmegaConf.structured(ExperimentConfig)
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        _refuse_interpolations(merged)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        raise ConfigError(f"{source}: config key '{key}': {message}") from error
    assert isinstance(config, ExperimentConfig)
    validate(config, source)
    return config


def _refuse_interpolations(node: Any, prefix: str = "") -> None:
    """``${...}`` would read the environment (``oc.env``) or other keys at resolve time; a
    config is data, so any interpolation is an error naming its key."""
    for key in node.keys() if OmegaConf.is_dict(node) else range(len(node)):
        name = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_interpolation(node, key):
            raise ConfigError(f"config key '{name}': interpolations (${{...}}) are not allowed")
        child = node._get_node(key)
        if OmegaConf.is_config(child):
            _refuse_interpolations(child, name)


def to_yaml(config: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
