"""The ``features`` config resolved against a real (tiny MovieLens) manifest: groups, declared
columns, errors naming keys and files, shared and own tables, weights and counter flags, id
policies reaching the loader; and a tiny training run with a group ablation and a declared subset."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import trainer.features as features_module
from config import ConfigError, ExperimentConfig, Pooling, load_config
from data_pipeline.counters import counter_bucket
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import MANIFEST_NAME, Manifest
from models.feature_layout import TableLayout
from tests.tiny_dataset import TINY_MODEL
from tests.tiny_movielens import write_tiny_movielens
from trainer.build import build_unsharded_model, loader_spec
from trainer.features import ResolvedFeatures, report, resolve_features
from trainer.runtime.distributed import shutdown
from trainer.train import train

TEXT = "item_title_tokens"
COUNTERS = [f"item_{k}_count_{w}" for k in ("rating", "like") for w in ("1d", "7d", "30d")]
NOT_DECLARED = "present in the data but not in features.columns (features.undeclared=skip)"


@pytest.fixture(scope="module")
def movielens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = write_tiny_movielens(tmp_path_factory.mktemp("ml"))
    return root, Manifest.load(root)


def _config(root: Path, *overrides: str) -> ExperimentConfig:
    return load_config(None, [f"data.path={root}", *TINY_MODEL, "data.num_workers=0", *overrides])


def _declare(*columns: str, undeclared: str = "skip") -> list[str]:
    """Overrides declaring ``columns`` in ``features.columns`` with their defaults (the other
    data features: ``features.undeclared``, skipped unless told otherwise)."""
    return [f"features.columns.{name}.enabled=true" for name in columns] + [
        f"features.undeclared={undeclared}"
    ]


def _resolve(root: Path, manifest: Manifest, *overrides: str) -> ResolvedFeatures:
    return resolve_features(manifest, _config(root, *overrides))


def _names(resolved: ResolvedFeatures) -> list[str]:
    return [f.name for f in resolved.schema.features]


def test_default_config_uses_every_feature(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    resolved = _resolve(root, manifest)
    assert resolved.schema.features == manifest.schema.features
    assert resolved.left_out == ()
    assert resolved.tables == manifest.tables
    assert resolved.layout.dense == tuple(COUNTERS)
    assert resolved.layout.not_embedded == frozenset()
    assert resolved.layout.table("text_tokens") == TableLayout(Pooling.MEAN, True, None)
    assert resolved.encoding.mean_weighted == frozenset({TEXT})
    lines = report(resolved)
    assert f"features: text: {TEXT}" in lines
    assert "features: context: ctx_hour, ctx_weekday" in lines
    assert not any("left out" in line for line in lines)


def test_groups_leave_out_the_others_with_reasons(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    resolved = _resolve(root, manifest, "features.groups=[id,history]")
    assert _names(resolved) == ["user_id", "hist_item_ids", "item_id"]
    reasons = dict(resolved.left_out)
    assert set(reasons) == {f.name for f in manifest.schema.features} - set(_names(resolved))
    assert reasons["gender"] == "group 'categorical' not in features.groups"
    assert reasons["ctx_hour"] == "group 'context' not in features.groups"
    assert reasons[TEXT] == "group 'text' not in features.groups"
    assert reasons["item_like_count_1d"] == "group 'counter' not in features.groups"
    assert resolved.layout.dense == ()
    lines = report(resolved)
    assert "features: left out 'genres': group 'categorical' not in features.groups" in lines
    assert "features: history: hist_item_ids" in lines


def test_declared_subset_reports_the_undeclared(movielens, caplog) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    declared = ["user_id", "item_id", TEXT, "item_rating_count_7d"]
    resolved = _resolve(root, manifest, *_declare(*reversed(declared)))
    assert _names(resolved) == declared  # manifest order, not declaration order
    reasons = dict(resolved.left_out)
    assert set(reasons) == {f.name for f in manifest.schema.features} - set(declared)
    assert set(reasons.values()) == {NOT_DECLARED}
    with caplog.at_level(logging.WARNING, logger="trainer.features"):
        lines = report(resolved)
    assert f"features: left out 'ctx_weekday': {NOT_DECLARED}" in lines
    assert f"left out 'item_like_count_30d': {NOT_DECLARED}" in caplog.text


def test_undeclared_columns_are_used_by_default_or_refused(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    every = [f.name for f in manifest.schema.features]
    used = _resolve(root, manifest, *_declare("user_id", TEXT, undeclared="use"))
    assert _names(used) == every and used.left_out == ()
    notes = dict(used.undeclared)
    assert set(notes) == set(every) - {"user_id", TEXT}
    assert (
        "features: 'ctx_hour' present in the data but not in features.columns: used with "
        "the defaults" in report(used)
    )
    with pytest.raises(ConfigError, match=r"features\.columns.*'gender'.*undeclared=error"):
        _resolve(root, manifest, *_declare("user_id", "item_id", undeclared="error"))


def test_disabled_column_is_left_out(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    resolved = _resolve(
        root, manifest, *_declare("user_id", "item_id"), "features.columns.genres.enabled=false"
    )
    assert _names(resolved) == ["user_id", "item_id"]
    assert dict(resolved.left_out)["genres"] == "features.columns.genres.enabled=false"


def test_declared_column_absent_from_the_data_names_key_manifest_and_file(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    with pytest.raises(ConfigError) as error:
        _resolve(root, manifest, *_declare("user_id", "item_id", "item_colour"))
    message = str(error.value)
    data_file = root / manifest.splits["train"].files[0].path
    assert data_file.exists()
    for part in ("'item_colour'", "features.columns.item_colour", str(root / MANIFEST_NAME)):
        assert part in message
    assert f"{data_file} has no such column" in message


def test_declared_kind_mismatch_names_the_key(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    with pytest.raises(ConfigError, match=rf"features\.columns\.{TEXT}\.kind.*'counter'.*'text'"):
        _resolve(
            root, manifest, *_declare("user_id", "item_id"), f"features.columns.{TEXT}.kind=counter"
        )
    matching = _resolve(
        root, manifest, *_declare("user_id", "item_id"), f"features.columns.{TEXT}.kind=text"
    )
    assert TEXT in _names(matching)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (
            ["features.columns.hist_item_ids.pooling=sum", "features.columns.item_id.pooling=mean"],
            "pooling",
        ),
        (["features.columns.hist_item_ids.dim=8", "features.columns.item_id.dim=12"], "dim"),
    ],
)
def test_shared_table_conflicts_raise(movielens, settings: list[str], key: str) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    with pytest.raises(
        ConfigError, match=rf"features\.columns\.item_id\.{key}.*'item_id'.*'hist_item_ids'"
    ):
        _resolve(root, manifest, *_declare("user_id", "item_id"), *settings)


def test_shared_table_takes_the_one_declared_pooling(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    overrides = [*_declare("user_id", "item_id"), "features.columns.hist_item_ids.pooling=sum"]
    assert _resolve(root, manifest, *overrides).layout.table("item_id").pooling is Pooling.SUM
    model = build_unsharded_model(manifest, _config(root, *overrides))
    assert model.sparse_arch.embedding_bags["item_id"].mode == "sum"


def test_shared_table_takes_the_one_declared_dim(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    overrides = [*_declare("user_id", "item_id"), "features.columns.hist_item_ids.dim=8"]
    assert _resolve(root, manifest, *overrides).layout.table("item_id").dim == 8
    model = build_unsharded_model(manifest, _config(root, *overrides))
    assert model.sparse_arch.embedding_bags["item_id"].weight.shape == (6, 8)


def test_own_table_is_sized_like_the_data_and_loads(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    overrides = [*_declare("user_id", "item_id"), "features.columns.hist_item_ids.table=hist_items"]
    config = _config(root, *overrides)
    resolved = resolve_features(manifest, config)
    specs = {f.name: f for f in resolved.schema.features}
    assert specs["hist_item_ids"].table == "hist_items" and specs["item_id"].table == "item_id"
    assert resolved.tables["hist_items"] == manifest.tables["item_id"] == 6
    model = build_unsharded_model(manifest, config)
    bags = model.sparse_arch.embedding_bags
    assert bags["hist_items"].weight.shape == bags["item_id"].weight.shape == (6, 16)
    assert bags["hist_items"] is not bags["item_id"]
    loader = build_event_loader(loader_spec(config, "train", True, manifest), manifest, 0, 1)
    batch = next(iter(loader))
    assert batch.user_features.keys() == ["user_id", "hist_item_ids"]
    assert batch.user_features["hist_item_ids"].lengths().sum() > 0


def test_weighted_false_turns_weights_off(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    overrides = [*_declare("user_id", "item_id"), f"features.columns.{TEXT}.weighted=false"]
    config = _config(root, *overrides)
    resolved = resolve_features(manifest, config)
    text = next(f for f in resolved.schema.features if f.name == TEXT)
    assert text.weighted is False
    assert resolved.layout.table("text_tokens").weighted is False
    assert resolved.encoding.mean_weighted == frozenset()
    model = build_unsharded_model(manifest, config)
    assert model.weighted_arch is None and TEXT in model.pooled_features
    default = build_unsharded_model(manifest, _config(root, *_declare("user_id", "item_id", TEXT)))
    assert default.weighted_arch is not None and TEXT in default.weighted_features


def test_counter_flags_select_dense_and_embedded_inputs(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    dense_only, embedded_only = "item_rating_count_7d", "item_like_count_7d"
    overrides = [
        *_declare("user_id", "item_id"),
        f"features.columns.{dense_only}.bucketized=false",
        f"features.columns.{embedded_only}.dense=false",
    ]
    config = _config(root, *overrides)
    layout = resolve_features(manifest, config).layout
    assert layout.not_embedded == frozenset({dense_only})
    assert layout.dense == (dense_only,)
    assert dense_only not in layout.tables and embedded_only in layout.tables
    item_inputs = build_unsharded_model(manifest, config).item_tower.feature_names
    assert item_inputs == ["item_id", f"{dense_only}_value", embedded_only]


def test_counter_without_dense_or_buckets_is_a_config_error(movielens) -> None:  # type: ignore[no-untyped-def]
    root, _ = movielens
    name = "item_rating_count_1d"
    with pytest.raises(ConfigError, match=rf"features\.columns\.{name}'.*dense or bucketized"):
        _config(
            root,
            f"features.columns.{name}.kind=counter",
            f"features.columns.{name}.dense=false",
            f"features.columns.{name}.bucketized=false",
        )


@pytest.mark.parametrize(
    "overrides",
    [
        _declare("item_id", "gender"),
        [*_declare("item_id"), "features.columns.user_id.enabled=false"],
    ],
)
def test_dropping_user_id_is_an_error(movielens, overrides: list[str]) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    with pytest.raises(ConfigError, match="'user_id' is left out"):
        _resolve(root, manifest, *overrides)


def test_per_column_id_policy_reaches_the_loader(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    overrides = [*_declare("user_id", "item_id"), "features.columns.ctx_hour.id_policy=hash"]
    spec = loader_spec(_config(root, *overrides), "train", True, manifest)
    assert spec.id_policies == {"ctx_hour": "hash"}
    assert spec.id_policy == "error"
    assert loader_spec(_config(root), "train", True, manifest).id_policies == {}


def test_loader_batches_carry_counters_as_weights(movielens) -> None:  # type: ignore[no-untyped-def]
    """The resolved encoding reaches the loader: a counter's id is its bucket and its weight the
    normalized count of the row (the 12 valid rows, unshuffled, form one batch)."""
    root, manifest = movielens
    spec = loader_spec(_config(root), "valid", False, manifest)
    batch = next(iter(build_event_loader(spec, manifest, 0, 1)))
    rows = pq.read_table(root / "valid")
    assert batch.item_ids.tolist() == rows["item_id"].to_pylist()
    for name in ("item_rating_count_30d", "item_like_count_7d"):
        counts = rows[name].to_numpy()
        counter = batch.item_features[name]
        assert counter.values().tolist() == counter_bucket(counts, 24).tolist()
        stats = manifest.counters[name]
        expected = (np.log1p(counts) - stats["mean"]) / stats["std"]
        np.testing.assert_allclose(counter.weights().numpy(), expected, rtol=1e-5, atol=1e-6)


TRAIN = [
    *TINY_MODEL,
    "train.epochs=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "loss.label_weights={click: 1.0, like: 0.5}",
]


@pytest.mark.parametrize(
    "features",
    [
        ["features.groups=[id,history,categorical,text,counter,context]"],
        [
            *_declare("user_id", "item_id", "hist_item_ids", "item_rating_count_7d"),
            f"features.columns.{TEXT}.pooling=sum",
        ],
    ],
    ids=["groups", "declared-columns"],
)
def test_tiny_training_finishes_with_finite_loss(
    movielens, tmp_path: Path, caplog, features: list[str]
) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    overrides = [*TRAIN, f"data.path={root}", f"run.dir={tmp_path / 'run'}", *features]
    with caplog.at_level(logging.INFO, logger="trainer.features"):
        result = train(load_config(None, overrides))
    assert result.steps == 2 * math.ceil(manifest.splits["train"].rows / 8)
    assert result.rows_trained == 2 * manifest.splits["train"].rows
    assert math.isfinite(result.final_loss) and result.final_loss > 0
    assert result.skipped_steps == 0
    if "groups" in features[0]:
        assert "features: counter: " + ", ".join(COUNTERS) in caplog.text
        assert "left out" not in caplog.text
    else:
        assert f"left out 'ctx_hour': {NOT_DECLARED}" in caplog.text


def test_history_encoder_needs_the_history_group(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    overrides = ["features.groups=[id,categorical]", "model.history.enabled=true"]
    with pytest.raises(ConfigError, match=r"model\.history\.enabled.*hist_item_ids"):
        _resolve(root, manifest, *overrides)


def test_dropout_reaches_only_the_training_loader(movielens) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    config = _config(root, "features.columns.item_id.dropout=0.5", "seed=3")
    train = loader_spec(config, "train", True, manifest)
    assert train.encoding is not None and dict(train.encoding.dropout) == {"item_id": 0.5}
    assert train.encoding.dropout_seed == 3
    evaluation = loader_spec(config, "test", False, manifest)
    assert evaluation.encoding is not None and not evaluation.encoding.dropout
    batch = next(iter(build_event_loader(train, manifest, 0, 1)))
    lengths = batch.item_features["item_id"].lengths()
    assert 0 < int((lengths == 0).sum()) < len(lengths)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["features.columns.item_id.dropout=1.0"], r"item_id\.dropout.*\[0, 1\)"),
        (["features.columns.item_rating_count_7d.dropout=0.1"], r"counters cannot be dropped"),
        (
            ["features.columns.item_id.dropout=0.1", "model.history.enabled=true"],
            r"item_id\.dropout.*model\.history\.enabled",
        ),
    ],
)
def test_bad_dropout_is_a_config_error(movielens, overrides: list[str], match: str) -> None:  # type: ignore[no-untyped-def]
    root, manifest = movielens
    with pytest.raises(ConfigError, match=match):
        _resolve(root, manifest, *overrides)


def test_a_training_job_resolves_its_features_once(
    movielens: tuple[Path, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job resolves the features against the manifest once and hands the result to every
    builder: model, negatives, loaders, validation and the final evaluation."""
    original, calls = features_module.resolve_features, []

    def counted(*args: object, **kwargs: object) -> ResolvedFeatures:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    for module in list(sys.modules.values()):
        if getattr(module, "resolve_features", None) is original:
            monkeypatch.setattr(module, "resolve_features", counted)
    root, _ = movielens
    config = _config(
        root,
        f"run.dir={tmp_path / 'run'}",
        "train.max_steps=4",
        "train.progress_bar=false",
        "logging.wandb=false",
        "eval.every_n_steps=2",  # validation twice during training, then the test split
        "negatives.mixed.num_samples=8",
    )
    try:
        train(config)
    finally:
        shutdown()
    assert (tmp_path / "run" / "metrics.json").exists()
    assert len(calls) == 1
