"""How a user's own interaction log maps onto twotower's event rows (``twotower prepare events``).

Given by flags or by a small YAML file (``--mapping``)::

    user: customer_id            # required columns of the log
    item: sku
    timestamp: event_time        # optional: without it, the order of appearance is the time
    labels: [click, purchase]    # optional: without them, every row is a positive click
    dedup: keep_all              # keep_all | first | last, for repeated (user, item) pairs
    min_user_events: 5           # k-core, iterated to a fixed point
    min_item_events: 5
    items:                       # optional item table
      path: catalog.parquet
      key: sku
      categorical: [brand, category]
      lists: [tags]
      text: [title]
    users:                       # optional user table
      path: customers.csv
      key: customer_id
      categorical: [country]

Unknown keys, wrong types and impossible combinations raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

LABEL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
DEFAULT_LABEL = "click"


class DedupPolicy(enum.Enum):
    """What happens to repeated (user, item) events of one user."""

    KEEP_ALL = "keep_all"  # every event stays (repeat consumption)
    FIRST = "first"  # only the earliest event of each pair
    LAST = "last"  # only the latest event of each pair


@dataclass(frozen=True)
class SideTableMapping:
    """An item or user table: one row per key, with feature columns.

    Args:
        path: Parquet / CSV / TSV / JSONL file (or folder / glob of them).
        key: the column holding the log's raw item (user) id.
        categorical: columns with one value per row (strings or numbers): one embedding table
            each, with a vocabulary of the values seen.
        lists: list columns (a list of values per row, or a "|"-separated string): one
            vocabulary table each.
        text: free-text columns: hashed word and bigram ids with idf weights (item side).
    """

    path: Path
    key: str
    categorical: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    text: tuple[str, ...] = ()

    def columns(self) -> tuple[str, ...]:
        return (self.key, *self.categorical, *self.lists, *self.text)


@dataclass(frozen=True)
class EventMapping:
    """Columns of the log and what to do with them (module docstring).

    Args:
        user, item: raw id columns (any type; ids are compared as strings).
        timestamp: integer seconds, a timestamp column or ISO-8601 strings; None: the order of
            appearance (file by file, row by row) is the time.
        labels: numeric label columns (> 0 is engaged); empty: every row is a ``click``.
        dedup: repeated (user, item) pairs.
        min_user_events, min_item_events: k-core thresholds (1: no filtering).
        items, users: optional side tables.
    """

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = None
    labels: tuple[str, ...] = ()
    dedup: DedupPolicy = DedupPolicy.KEEP_ALL
    min_user_events: int = 1
    min_item_events: int = 1
    items: SideTableMapping | None = None
    users: SideTableMapping | None = None

    def __post_init__(self) -> None:
        if self.user == self.item:
            raise ValueError(f"user and item name the same column {self.user!r}")
        for key in ("min_user_events", "min_item_events"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}: must be an integer >= 1, got {value!r}")
        for label in self.label_names():
            if not LABEL_NAME.match(label):
                raise ValueError(
                    f"labels: {label!r} is not a usable label name (lower case letters, digits "
                    "and _, starting with a letter); rename the column"
                )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: {list(self.labels)} name a column twice")

    def label_names(self) -> tuple[str, ...]:
        """The labels the event rows carry (``click`` when the log has none)."""
        return self.labels or (DEFAULT_LABEL,)

    def log_columns(self) -> tuple[str, ...]:
        """Columns read from the log."""
        return (self.user, self.item, *((self.timestamp,) if self.timestamp else ()), *self.labels)


_SIDE_KEYS = {f.name for f in fields(SideTableMapping)}
_TOP_KEYS = {f.name for f in fields(EventMapping)}


def load_mapping(path: Path | str | None, overrides: dict[str, Any] | None = None) -> EventMapping:
    """An :class:`EventMapping` from a YAML file (None: none) with ``overrides`` (the command's
    flags) on top of its keys; errors name the file and the key."""
    data: dict[str, Any] = {}
    base = Path(".")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such mapping file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: a mapping file holds keys (user, item, ...), not {type(data)}"
            )
        base = path.parent
    try:
        return mapping_from_dict({**data, **(overrides or {})}, base=base)
    except ValueError as error:
        raise ValueError(f"{path}: {error}" if path is not None else str(error)) from error


def mapping_from_dict(data: dict[str, Any], base: Path = Path(".")) -> EventMapping:
    """Validate ``data`` (the YAML's keys); relative table paths resolve against ``base``."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; expected some of {sorted(_TOP_KEYS)}")
    values: dict[str, Any] = {}
    for key in ("user", "item", "timestamp"):
        if key in data and data[key] is not None:
            values[key] = _string(data[key], key)
    if "labels" in data:
        values["labels"] = _strings(data["labels"], "labels")
    if "dedup" in data:
        values["dedup"] = _dedup(data["dedup"])
    for key in ("min_user_events", "min_item_events"):
        if key in data:
            values[key] = data[key]
    for side in ("items", "users"):
        if data.get(side) is not None:
            values[side] = _side_table(data[side], side, base)
    return EventMapping(**values)


def _side_table(data: Any, side: str, base: Path) -> SideTableMapping:
    if not isinstance(data, dict):
        raise ValueError(f"{side}: expected keys path, key, categorical, lists, text")
    unknown = sorted(set(data) - _SIDE_KEYS)
    if unknown:
        raise ValueError(f"{side}: unknown key(s) {unknown}; expected some of {sorted(_SIDE_KEYS)}")
    for required in ("path", "key"):
        if required not in data:
            raise ValueError(f"{side}.{required}: required")
    path = Path(_string(data["path"], f"{side}.path"))
    table = SideTableMapping(
        path=path if path.is_absolute() else base / path,
        key=_string(data["key"], f"{side}.key"),
        categorical=_strings(data.get("categorical", []), f"{side}.categorical"),
        lists=_strings(data.get("lists", []), f"{side}.lists"),
        text=_strings(data.get("text", []), f"{side}.text"),
    )
    if side == "users" and table.text:
        raise ValueError("users.text: text columns are read on the item side only")
    repeated = [c for c in table.columns() if table.columns().count(c) > 1]
    if repeated:
        raise ValueError(f"{side}: column(s) {sorted(set(repeated))} appear twice")
    return table


def _dedup(value: Any) -> DedupPolicy:
    try:
        return DedupPolicy(value)
    except ValueError:
        choices = [p.value for p in DedupPolicy]
        raise ValueError(f"dedup: {value!r} is not one of {choices}") from None


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: expected a column name (a string), got {value!r}")
    return value


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected a list of column names, got {value!r}")
    return tuple(_string(v, key) for v in value)
