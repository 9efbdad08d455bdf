"""Config loading: defaults, YAML, overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, IdPolicy, ShardingType, load_config


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {batch_size: 128}\nsharding: {sharding_types: [column_wise]}\n")
    config = load_config(path, ["data.id_policy=hash", "train.max_steps=7"])
    assert config.data.batch_size == 128
    assert config.data.id_policy is IdPolicy.HASH
    assert config.sharding.sharding_types == [ShardingType.COLUMN_WISE]
    assert config.train.max_steps == 7


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_sise=3", "data.batch_sise"),
        ("data.batch_size=many", "data.batch_size"),
        ("data.id_policy=drop", "data.id_policy"),
        ("model.temperature=0", "model.temperature"),
        ("data.batch_size=1", "data.batch_size"),
        ("eval.cold_item_max_events=-1", "eval.cold_item_max_events"),
        ("eval.cold_item_max_events=0", "eval.cold_item_max_events"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("negatives.log_q.enabled=true", "negatives.log_q.enabled"),
        ("negatives.mixed.num_samples=8", "negatives.mixed.num_samples"),
        ("negatives.memory.size=64", "negatives.memory.size"),
        ("negatives.impressions.per_row=1", "negatives.impressions.per_row"),
        ("negatives.mined.per_row=1", "negatives.mined.per_row"),
    ],
)
def test_logged_bce_refuses_negative_sources(override: str, key: str) -> None:
    """The pointwise family on logged labels scores no candidates: a source would be waste."""
    with pytest.raises(ConfigError, match=rf"'{key}'.*logged_bce"):
        load_config(None, ["loss.family=logged_bce", override])
    load_config(None, [override])  # the same source with a candidate family is fine


def test_cold_item_threshold_default_and_override() -> None:
    assert load_config(None).eval.cold_item_max_events == 5
    assert load_config(None, ["eval.cold_item_max_events=1"]).eval.cold_item_max_events == 1


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'train.epochz'"):
        load_config(path)


def test_shipped_configs_load() -> None:
    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_loading_a_config_imports_nothing_heavy() -> None:
    """The config package sits on the ground floor: loading every shipped config imports
    neither torch, FBGEMM, TorchRec nor any other project package."""
    code = (
        "import sys, glob\n"
        "from config import load_config\n"
        "for path in sorted(glob.glob('configs/*.yaml')):\n"
        "    load_config(path)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fbgemm_gpu', "
        "'torchrec', 'data_pipeline', 'models', 'trainer', 'launch', 'bench'})\n"
        "print(heavy)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
