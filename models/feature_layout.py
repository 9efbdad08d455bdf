"""How the model embeds its features beyond what the schema says: per-table pooling, weights and
dimension, and which counters feed the towers as dense values (resolved from the ``features``
config by :mod:`trainer.features`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from config import Pooling
from data_pipeline.schema import EventSchema, FeatureKind


@dataclass(frozen=True)
class TableLayout:
    """One embedding table as the model builds it.

    Args:
        pooling: over each bag (a weighted table sums; mean comes from normalized weights).
        weighted: the table lives in the weighted ``EmbeddingBagCollection``.
        dim: embedding dimension; None for the model default.
    """

    pooling: Pooling = Pooling.MEAN
    weighted: bool = False
    dim: int | None = None


@dataclass(frozen=True)
class FeatureLayout:
    """What the model needs beyond the schema.

    Args:
        tables: table name -> layout (tables not listed: mean pooling, unweighted, default dim).
        dense: counter features whose normalized value feeds the tower MLP (one input each).
        not_embedded: counter features whose bucket id is not looked up.
    """

    tables: dict[str, TableLayout] = field(default_factory=dict)
    dense: tuple[str, ...] = ()
    not_embedded: frozenset[str] = frozenset()

    def table(self, name: str) -> TableLayout:
        return self.tables.get(name, TableLayout())

    @staticmethod
    def from_schema(schema: EventSchema) -> FeatureLayout:
        """Defaults: tables read by a weighted feature are weighted, counters dense and embedded."""
        weighted = {f.table for f in schema.features if f.weighted}
        return FeatureLayout(
            tables={t: TableLayout(Pooling.MEAN, True) for t in weighted},
            dense=tuple(f.name for f in schema.features if f.kind is FeatureKind.COUNTER),
        )
