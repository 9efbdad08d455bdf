"""The one place that names columns, dtypes and feature kinds, and validates shards against them.

Event shards (``train/``, ``valid/``, ``test/``) hold one logged event per row:

==================  ======================  =================================================
column              Arrow type              meaning
==================  ======================  =================================================
``user_id``         int64                   user id, in ``[0, tables["user_id"])``
``item_id``         int64                   item id of the event, in ``[0, tables["item_id"])``
``timestamp``       int64                   event time (seconds)
``position``        int32, nullable         feed position of an impression; null if unknown
``label_<name>``    float32                 one column per reward label, in ``manifest.labels``
``ranker_score``    float32, optional       logged ranking-model score (synthetic worlds)
``impression_       list<int64>, optional   items shown in the same request (same user, same
negative_ids``                              time) and not engaged (every label 0), by
                                            position, never the row's own item; possibly empty
``hist_item_ids``   list<int64>             item ids the user interacted with strictly before
                                            this event, newest first, at most H
``hist_<action>``   list<int8>              one aligned action series per history event
user features       int64 / list<int64>     declared in ``manifest.features`` (side = user)
item features       int64 / list<int64>     declared in ``manifest.features`` (side = item)
``<f>_weights``     list<float32>           per-id weights of a weighted feature ``f``
                                            (idf of text tokens, topic affinities), aligned
                                            with ``f``'s ids
counter ``<f>``     int64                   a point-in-time count (``data_pipeline/counters``)
==================  ======================  =================================================

``items/`` holds ``item_id`` plus every item feature; ``users/`` holds ``user_id`` plus every
user feature that is not ``per_event`` (context and search history change with each event, so
they live in event rows only). Feature columns carry embedding-table ids; ``manifest.tables``
gives each table's number of rows. Several features may share one table (``hist_item_ids`` reads
``item_id``; search query tokens may read the item text table).

Feature kinds (storage) and groups (meaning):

* kind ``id`` (int64), ``ids`` (list<int64>, optionally with a ``<f>_weights`` column) and
  ``counter`` (int64 count; the model reads ``(log1p(count) - mean) / std`` as a dense input,
  with statistics in ``manifest.counters``, and :func:`~data_pipeline.counters.counter_bucket`
  as an embedding id of table ``f``).
* group ``id`` (user/item id), ``history`` (item ids of the user's past), ``categorical``
  (static side features), ``text`` (hashed title tokens, :mod:`data_pipeline.text`),
  ``counter`` (dynamic popularity), ``context`` (hour, weekday, device, locale of the event),
  ``search`` (the user's recent query tokens) and ``affinity`` (weighted ids, e.g. topic or
  genre affinities). Configs switch features on and off by group (``features.groups``).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from config import FeatureGroup

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
POSITION = "position"
RANKER_SCORE = "ranker_score"
HISTORY_ITEMS = "hist_item_ids"
IMPRESSION_NEGATIVES = "impression_negative_ids"
# Event time of each history entry, aligned with hist_item_ids (recency features).
HISTORY_TIMESTAMPS = "hist_timestamps"
LABEL_PREFIX = "label_"
HISTORY_ACTION_PREFIX = "hist_"


class Side(enum.Enum):
    USER = "user"
    ITEM = "item"


class FeatureKind(enum.Enum):
    """``ID``: one id per row (int64 column). ``IDS``: a jagged bag of ids (list<int64> column).
    ``COUNTER``: a non-negative int64 count, fed as a normalized dense value and a bucket id."""

    ID = "id"
    IDS = "ids"
    COUNTER = "counter"


WEIGHTS_SUFFIX = "_weights"


def weights_column(feature: str) -> str:
    """Name of the list<float32> weights column aligned with ``feature``'s ids."""
    return f"{feature}{WEIGHTS_SUFFIX}"


def _default_group(name: str, kind: FeatureKind) -> FeatureGroup:
    """Group of a feature from a manifest written before groups existed."""
    if name in (USER_ID, ITEM_ID):
        return FeatureGroup.ID
    if name == HISTORY_ITEMS:
        return FeatureGroup.HISTORY
    return FeatureGroup.COUNTER if kind is FeatureKind.COUNTER else FeatureGroup.CATEGORICAL


class SchemaError(ValueError):
    """Raised when a shard or manifest does not match the data contract; the message names
    the file, row group and column involved."""


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse feature: a Parquet column looked up in an embedding table.

    Args:
        name: column name, also the ``KeyedJaggedTensor`` key.
        side: which tower reads it.
        kind: scalar id, jagged id list or counter.
        table: embedding table name (shared tables are named by several features); for a
            counter, the table of its buckets.
        group: what the feature means (:class:`FeatureGroup`); defaults from the name and kind.
        weighted: an ``ids`` feature with a ``<name>_weights`` list<float32> column.
        per_event: the value depends on the event (context, search history), so the feature is
            absent from the ``users/`` / ``items/`` side tables.
    """

    name: str
    side: Side
    kind: FeatureKind
    table: str
    group: FeatureGroup | None = None
    weighted: bool = False
    per_event: bool = False

    def __post_init__(self) -> None:
        if self.group is None:
            object.__setattr__(self, "group", _default_group(self.name, self.kind))
        if self.weighted and self.kind is not FeatureKind.IDS:
            raise SchemaError(f"feature '{self.name}': only 'ids' features can be weighted")

    @property
    def feature_group(self) -> FeatureGroup:
        assert self.group is not None  # set in __post_init__
        return self.group

    def arrow_type(self) -> pa.DataType:
        return pa.list_(pa.int64()) if self.kind is FeatureKind.IDS else pa.int64()

    def arrow_fields(self) -> list[pa.Field]:
        """The feature's column, and its weights column when weighted."""
        fields = [pa.field(self.name, self.arrow_type(), nullable=False)]
        if self.weighted:
            fields.append(pa.field(weights_column(self.name), pa.list_(pa.float32()), False))
        return fields

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["side"] = self.side.value
        data["kind"] = self.kind.value
        data["group"] = self.feature_group.value
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> FeatureSpec:
        group = data.get("group")
        return FeatureSpec(
            name=data["name"],
            side=Side(data["side"]),
            kind=FeatureKind(data["kind"]),
            table=data["table"],
            group=FeatureGroup(group) if group is not None else None,
            weighted=bool(data.get("weighted", False)),
            per_event=bool(data.get("per_event", False)),
        )


def label_column(label: str) -> str:
    return f"{LABEL_PREFIX}{label}"


def history_action_column(action: str) -> str:
    return f"{HISTORY_ACTION_PREFIX}{action}"


@dataclass(frozen=True)
class EventSchema:
    """The columns an event shard must have, derived from the manifest.

    Args:
        features: every sparse feature, user and item side.
        labels: reward label names, ``T = len(labels)``.
        history_actions: action names with an aligned ``hist_<action>`` series.
        has_position: whether ``position`` must be present (nullable either way).
        has_ranker_score: whether ``ranker_score`` must be present.
        has_impression_negatives: whether ``impression_negative_ids`` must be present (logged
            feeds with unengaged impressions; ratings-only datasets have none).
        has_history_timestamps: whether ``hist_timestamps`` (event time of each history entry,
            aligned with ``hist_item_ids``) must be present.
    """

    features: tuple[FeatureSpec, ...]
    labels: tuple[str, ...]
    history_actions: tuple[str, ...] = ()
    has_position: bool = True
    has_ranker_score: bool = False
    has_impression_negatives: bool = False
    has_history_timestamps: bool = False

    def user_features(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.side is Side.USER)

    def item_features(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.side is Side.ITEM)

    def event_arrow_schema(self) -> pa.Schema:
        fields = [
            pa.field(USER_ID, pa.int64(), nullable=False),
            pa.field(ITEM_ID, pa.int64(), nullable=False),
            pa.field(TIMESTAMP, pa.int64(), nullable=False),
        ]
        if self.has_position:
            fields.append(pa.field(POSITION, pa.int32(), nullable=True))
        fields += [pa.field(label_column(x), pa.float32(), nullable=False) for x in self.labels]
        if self.has_ranker_score:
            fields.append(pa.field(RANKER_SCORE, pa.float32(), nullable=True))
        if self.has_impression_negatives:
            fields.append(pa.field(IMPRESSION_NEGATIVES, pa.list_(pa.int64()), nullable=False))
        taken = {f.name for f in fields}
        for feature in self.features:
            if feature.name not in taken:
                fields += feature.arrow_fields()
                taken.add(feature.name)
        fields += [
            pa.field(history_action_column(a), pa.list_(pa.int8()), nullable=False)
            for a in self.history_actions
        ]
        if self.has_history_timestamps:
            fields.append(pa.field(HISTORY_TIMESTAMPS, pa.list_(pa.int64()), nullable=False))
        return pa.schema(fields)

    def side_arrow_schema(self, side: Side) -> pa.Schema:
        """Schema of ``items/`` (side=ITEM) or ``users/`` (side=USER) shards."""
        key = ITEM_ID if side is Side.ITEM else USER_ID
        fields = [pa.field(key, pa.int64(), nullable=False)]
        for feature in self.features:
            if (
                feature.side is side
                and feature.name != key
                and feature.name != HISTORY_ITEMS
                and not feature.per_event
            ):
                fields += feature.arrow_fields()
        return pa.schema(fields)

    def to_json(self) -> dict[str, Any]:
        return {
            "features": [f.to_json() for f in self.features],
            "labels": list(self.labels),
            "history_actions": list(self.history_actions),
            "has_position": self.has_position,
            "has_ranker_score": self.has_ranker_score,
            "has_impression_negatives": self.has_impression_negatives,
            "has_history_timestamps": self.has_history_timestamps,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> EventSchema:
        return EventSchema(
            features=tuple(FeatureSpec.from_json(f) for f in data["features"]),
            labels=tuple(data["labels"]),
            history_actions=tuple(data.get("history_actions", ())),
            has_position=bool(data.get("has_position", True)),
            has_ranker_score=bool(data.get("has_ranker_score", False)),
            has_impression_negatives=bool(data.get("has_impression_negatives", False)),
            has_history_timestamps=bool(data.get("has_history_timestamps", False)),
        )


def validate_arrow_schema(found: pa.Schema, expected: pa.Schema, path: Path | str) -> None:
    """Check that every expected column exists with the expected type.

    Raises:
        SchemaError: naming the file, the column, and the expected vs. found type.
    """
    for field in expected:
        index = found.get_field_index(field.name)
        if index < 0:
            raise SchemaError(
                f"{path}: missing column '{field.name}' (expected {field.type}); "
                f"found columns {found.names}"
            )
        found_type = found.field(index).type
        if not found_type.equals(field.type) and not _compatible(found_type, field.type):
            raise SchemaError(
                f"{path}: column '{field.name}' has type {found_type}, expected {field.type}"
            )


def _compatible(found: pa.DataType, expected: pa.DataType) -> bool:
    # large_list / list and int32 vs int64 ids are safe to widen; floats are not ids.
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        if pa.types.is_list(found) or pa.types.is_large_list(found):
            return _compatible(found.value_type, expected.value_type) or found.value_type.equals(
                expected.value_type
            )
        return False
    if pa.types.is_integer(expected):
        return pa.types.is_integer(found)
    return False
