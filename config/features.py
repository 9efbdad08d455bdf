"""The ``features`` section of an experiment config: which data columns the towers read and how.

```yaml
features:
  groups: [id, history, categorical, text, counter, context, search, affinity]
  columns:                      # optional: when given, exactly these columns are used
    item_title_tokens: {kind: text, pooling: mean, weighted: true, dim: 32}
    search_query_tokens: {kind: search, table: text_tokens}     # share the title token table
    item_rating_count_7d: {kind: counter, dense: true, bucketized: true}
    ctx_hour: {kind: context, id_policy: error}
```

Every column named in ``columns`` must exist in the data and be of the declared kind (its
feature group). Data features that ``columns`` does not name are reported at start and, by
``undeclared``, used with the defaults (``use``), left out (``skip``) or refused (``error``).
Without ``columns``, every data feature of an enabled group is used with the defaults. The resolution
against the manifest lives in :mod:`trainer.features`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from config.errors import Fail


class FeatureGroup(enum.Enum):
    """What a feature means; configs select features by group (module docstring)."""

    ID = "id"
    HISTORY = "history"
    CATEGORICAL = "categorical"
    TEXT = "text"
    COUNTER = "counter"
    CONTEXT = "context"
    SEARCH = "search"
    AFFINITY = "affinity"


class Pooling(enum.Enum):
    """How a bag of ids becomes one vector: sum or mean (weighted: weighted sum / mean)."""

    SUM = "sum"
    MEAN = "mean"


class Undeclared(enum.Enum):
    """What happens to a data feature that a non-empty ``features.columns`` does not name."""

    USE = "use"
    SKIP = "skip"
    ERROR = "error"


class IdPolicy(enum.Enum):
    """What to do with an id outside its table: ``error`` stops, ``hash`` folds it in range
    (``data.id_policy``, and per feature ``features.columns.<name>.id_policy``)."""

    ERROR = "error"
    HASH = "hash"


@dataclass
class FeatureConfig:
    """One column (``features.columns.<name>``).

    Args:
        kind: the feature group the column must have in the data (a declaration that is
            checked; null accepts any).
        enabled: false leaves the column out.
        table: embedding table; null: the data's table. Naming another feature's table
            shares it; a new name gives the feature its own table, sized like the data's.
        dim: embedding dimension of the table (null: ``model.table_dims`` / ``embedding_dim``).
        pooling: sum or mean over the bag (features of one table must agree); null: mean
            unless another feature of the table sets it.
        weighted: use the column's per-id weights (idf, affinity) when it has them.
        id_policy: ``error`` / ``hash`` for out-of-range ids; null: ``data.id_policy``.
        dense: counters only: feed the normalized ``log1p`` count to the tower MLP.
        bucketized: counters only: embed the log2 bucket of the count.
        dropout: share of training rows whose bag of this feature is emptied (e.g. ``item_id``:
            the item tower learns to embed items from their content, as cold items need).
    """

    kind: FeatureGroup | None = None
    enabled: bool = True
    table: str | None = None
    dim: int | None = None
    pooling: Pooling | None = None
    weighted: bool = True
    id_policy: IdPolicy | None = None
    dense: bool = True
    bucketized: bool = True
    dropout: float = 0.0


@dataclass
class FeaturesConfig:
    """Args:
    groups: feature groups switched on (ablations drop groups).
    columns: per-column declarations and settings.
    undeclared: data features ``columns`` does not name (when it names any): used with the
        defaults, skipped, or an error.
    """

    groups: list[FeatureGroup] = field(default_factory=lambda: list(FeatureGroup))
    columns: dict[str, FeatureConfig] = field(default_factory=dict)
    undeclared: Undeclared = Undeclared.USE


def validate_features(features: FeaturesConfig, fail: Fail) -> None:
    """Checks that need no data (the rest happen against the manifest at start)."""
    if FeatureGroup.ID not in features.groups:
        fail("features.groups", "must include 'id' (the user and item ids)")
    for name, column in features.columns.items():
        key = f"features.columns.{name}"
        if column.dim is not None and column.dim < 1:
            fail(f"{key}.dim", "must be >= 1 or null")
        if column.table is not None and not column.table:
            fail(f"{key}.table", "must be a table name or null")
        if column.kind is FeatureGroup.COUNTER and not (column.dense or column.bucketized):
            fail(key, "a counter needs dense or bucketized (or enabled: false)")
        if not 0.0 <= column.dropout < 1.0:
            fail(f"{key}.dropout", "must be in [0, 1)")
