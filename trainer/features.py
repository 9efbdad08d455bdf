"""Resolves the ``features`` config against a dataset's manifest, once, at start.

The result says which stored features the towers read, from which tables (shared or own), with
which dimension, pooling, weights and id policy, and how counters are fed. The batch builder,
the item store and the model are all built from it, so they agree by construction.

Reported at start (:func:`report`): data features left out because ``features.columns`` does not
name them, and those of disabled groups. A column named in the config but absent from the data
is a :class:`~config.ConfigError` naming the column, the manifest and a data file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow.parquet as pq

from config import ConfigError, ExperimentConfig, FeatureConfig, Pooling, Undeclared
from data_pipeline.feature_encoding import FeatureEncoding
from data_pipeline.manifest import MANIFEST_NAME, Manifest
from data_pipeline.schema import (
    HISTORY_ITEMS,
    ITEM_ID,
    EventSchema,
    FeatureGroup,
    FeatureKind,
    FeatureSpec,
    SchemaError,
)
from models.feature_layout import FeatureLayout, TableLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedFeatures:
    """Args:
    schema: the manifest's schema restricted to the features used (tables and weight flags as
        configured); derived features are added on top by ``with_derived_features``.
    tables: table name -> rows (the manifest's plus features' own tables).
    layout: tables and counters for the model.
    encoding: counter statistics and weight normalization for the batches and the item store.
    id_policies: column -> ``error`` / ``hash`` where the config overrides ``data.id_policy``.
    left_out: (feature, reason) of every data feature not used.
    undeclared: (feature, note) of data features ``features.columns`` does not name, used with
        the defaults.
    dropout: feature -> share of training rows whose bag is emptied (training loader only).
    """

    schema: EventSchema
    tables: dict[str, int]
    layout: FeatureLayout
    encoding: FeatureEncoding
    id_policies: dict[str, str]
    left_out: tuple[tuple[str, str], ...]
    undeclared: tuple[tuple[str, str], ...] = ()
    dropout: dict[str, float] = field(default_factory=dict)


def _first_data_file(manifest: Manifest, root: Path) -> Path | None:
    for split in ("train", "valid", "test"):
        if split in manifest.splits and manifest.splits[split].files:
            return root / manifest.splits[split].files[0].path
    return None


def _absent_column_error(name: str, manifest: Manifest, root: Path) -> ConfigError:
    where = f"{root / MANIFEST_NAME} (dataset '{manifest.dataset}') lists no feature '{name}'"
    path = _first_data_file(manifest, root)
    if path is not None and path.exists():
        columns = pq.read_schema(path).names
        state = "has it" if name in columns else "has no such column"
        where += f", and {path} {state} (its columns: {columns})"
    known = [f.name for f in manifest.schema.features]
    return ConfigError(
        f"config key 'features.columns.{name}': column '{name}' is not in the data: {where}. "
        f"Features of this dataset: {known}"
    )


def _select(
    manifest: Manifest, config: ExperimentConfig, root: Path
) -> tuple[list[tuple[FeatureSpec, FeatureConfig]], list[tuple[str, str]], list[tuple[str, str]]]:
    """The (feature, its config) pairs used, (name, reason) of those left out, and (name,
    note) of undeclared features used with the defaults."""
    declared = config.features.columns
    groups = set(config.features.groups)
    stored = {f.name: f for f in manifest.schema.features}
    for name in declared:
        if name not in stored:
            raise _absent_column_error(name, manifest, root)
    used: list[tuple[FeatureSpec, FeatureConfig]] = []
    left_out: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    for feature in manifest.schema.features:
        group = feature.feature_group
        column = declared.get(feature.name)
        if column is not None and column.kind is not None and column.kind is not group:
            raise ConfigError(
                f"config key 'features.columns.{feature.name}.kind': declared "
                f"'{column.kind.value}', but the data's column is a '{group.value}' feature "
                f"({feature.kind.value}, table '{feature.table}') in "
                f"{root / MANIFEST_NAME}"
            )
        if declared and column is None:
            undeclared = config.features.undeclared
            reason = "present in the data but not in features.columns"
            if undeclared is Undeclared.ERROR:
                raise ConfigError(
                    f"config key 'features.columns': data column '{feature.name}' "
                    f"({group.value}) of {root / MANIFEST_NAME} is not declared "
                    "(features.undeclared=error)"
                )
            if undeclared is Undeclared.SKIP:
                left_out.append((feature.name, f"{reason} (features.undeclared=skip)"))
                continue
            notes.append((feature.name, f"{reason}: used with the defaults"))
        if group not in groups:
            left_out.append((feature.name, f"group '{group.value}' not in features.groups"))
        elif column is not None and not column.enabled:
            left_out.append((feature.name, f"features.columns.{feature.name}.enabled=false"))
        else:
            used.append((feature, column or FeatureConfig()))
    names = {f.name for f, _ in used}
    for required in ("user_id", "item_id"):
        if required in stored and required not in names:
            raise ConfigError(
                f"config key 'features': '{required}' is left out; both towers need their id"
            )
    if config.model.history.enabled and HISTORY_ITEMS not in names:
        raise ConfigError(
            f"config key 'model.history.enabled': the history encoder reads '{HISTORY_ITEMS}', "
            "which the features config leaves out (add group 'history')"
        )
    return used, left_out, notes


@dataclass
class _TableWishes:
    """What the features reading one table ask of it: (value, feature that set it)."""

    pooling: tuple[Pooling, str] | None = None
    dim: tuple[int, str] | None = None
    weighted: bool = False

    def ask(self, attribute: str, value: object, name: str, table: str) -> None:
        """Record ``name``'s explicit ``attribute`` (None: no wish); features must agree."""
        if value is None:
            return
        current = getattr(self, attribute)
        if current is None:
            setattr(self, attribute, (value, name))
        elif current[0] != value:
            shown = getattr(value, "value", value)
            theirs = getattr(current[0], "value", current[0])
            raise ConfigError(
                f"config key 'features.columns.{name}.{attribute}': table '{table}' is shared "
                f"with '{current[1]}', which sets {attribute}={theirs}, not {shown}"
            )

    def layout(self) -> TableLayout:
        pooling = self.pooling[0] if self.pooling else Pooling.MEAN
        return TableLayout(pooling, self.weighted, self.dim[0] if self.dim else None)


def _check_dropout(feature: FeatureSpec, config: ExperimentConfig) -> None:
    key = f"config key 'features.columns.{feature.name}.dropout'"
    if feature.kind is FeatureKind.COUNTER:
        raise ConfigError(f"{key}: counters cannot be dropped (use dense/bucketized)")
    if config.model.history.enabled and feature.name in (ITEM_ID, HISTORY_ITEMS):
        raise ConfigError(
            f"{key}: with model.history.enabled the item id and history are sequences of one "
            "id per event, which dropout would break"
        )


@dataclass
class _Placement:
    """The used features placed on their tables, one at a time (:meth:`add`)."""

    tables: dict[str, int]
    wishes: dict[str, _TableWishes] = field(default_factory=dict)
    features: list[FeatureSpec] = field(default_factory=list)
    id_policies: dict[str, str] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    dropout: dict[str, float] = field(default_factory=dict)
    not_embedded: set[str] = field(default_factory=set)
    counter_tables: dict[str, str] = field(default_factory=dict)

    def add(
        self,
        feature: FeatureSpec,
        column: FeatureConfig,
        manifest: Manifest,
        config: ExperimentConfig,
    ) -> None:
        """Places ``feature`` as its ``features.columns`` entry ``column`` asks."""
        table = column.table or feature.table
        if table not in self.tables:
            self.tables[table] = manifest.tables[feature.table]
        elif self.tables[table] < manifest.tables[feature.table]:
            raise ConfigError(
                f"config key 'features.columns.{feature.name}.table': table '{table}' has "
                f"{self.tables[table]} rows, fewer than the {manifest.tables[feature.table]} "
                f"ids of '{feature.name}'"
            )
        weighted = feature.weighted and column.weighted
        self.features.append(replace(feature, table=table, weighted=weighted))
        if column.id_policy is not None:
            self.id_policies[feature.name] = column.id_policy.value
        if column.dropout > 0:
            _check_dropout(feature, config)
            self.dropout[feature.name] = column.dropout
        if feature.kind is FeatureKind.COUNTER:
            self.counter_tables[table] = feature.name
            if column.dense:
                self.dense.append(feature.name)
            if not column.bucketized:
                self.not_embedded.add(feature.name)
                return
        wish = self.wishes.setdefault(table, _TableWishes())
        wish.ask("pooling", column.pooling, feature.name, table)
        wish.ask("dim", column.dim, feature.name, table)
        wish.weighted = wish.weighted or weighted

    def layouts(self, config: ExperimentConfig) -> dict[str, TableLayout]:
        """Each embedded table's layout; a counter's bucket table may not be weighted."""
        for table, wish in self.wishes.items():
            if wish.dim is None and table in config.model.table_dims:
                wish.dim = (config.model.table_dims[table], "model.table_dims")
        layouts = {table: wish.layout() for table, wish in self.wishes.items()}
        for table, counter in self.counter_tables.items():
            if layouts.get(table, TableLayout()).weighted:
                raise ConfigError(
                    f"config key 'features.columns.{counter}.table': counter bucket table "
                    f"'{table}' is shared with a weighted feature (its weights are the dense "
                    "counter value)"
                )
        return layouts


def resolve_features(manifest: Manifest, config: ExperimentConfig) -> ResolvedFeatures:
    """Raises:
    ConfigError: naming the ``features`` key (absent column, kind mismatch, conflicting shared
        table settings, counter statistics missing).
    """
    root = Path(config.data.path)
    used, left_out, notes = _select(manifest, config, root)
    placed = _Placement(dict(manifest.tables))
    for feature, column in used:
        placed.add(feature, column, manifest, config)
    layouts = placed.layouts(config)
    features, tables = placed.features, placed.tables
    mean_weighted = frozenset(
        f.name
        for f in features
        if layouts.get(f.table, TableLayout()).weighted
        and f.kind is FeatureKind.IDS
        and layouts[f.table].pooling is Pooling.MEAN
    )
    schema = replace(manifest.schema, features=tuple(features))
    try:
        encoding = FeatureEncoding.from_manifest(manifest.counters, tables, features, mean_weighted)
    except (SchemaError, ValueError) as error:
        raise ConfigError(f"config key 'features': {root / MANIFEST_NAME}: {error}") from error
    layout = FeatureLayout(layouts, tuple(placed.dense), frozenset(placed.not_embedded))
    return ResolvedFeatures(
        schema=schema,
        tables=tables,
        layout=layout,
        encoding=encoding,
        id_policies=placed.id_policies,
        left_out=tuple(left_out),
        undeclared=tuple(notes),
        dropout=placed.dropout,
    )


def report(resolved: ResolvedFeatures) -> list[str]:
    """Log (and return) one line per group used and per data feature left out."""
    lines = []
    by_group: dict[FeatureGroup, list[str]] = {}
    for feature in resolved.schema.features:
        by_group.setdefault(feature.feature_group, []).append(feature.name)
    for group, names in by_group.items():
        lines.append(f"features: {group.value}: {', '.join(names)}")
    notices = [f"features: left out '{name}': {reason}" for name, reason in resolved.left_out]
    notices += [f"features: '{name}' {note}" for name, note in resolved.undeclared]
    for line in lines:
        logger.info(line)
    for line in notices:
        logger.warning(line)
    return lines + notices
