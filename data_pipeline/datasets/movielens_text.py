"""MovieLens title text: hashed unigram/bigram ids of each movie's title, weighted by idf.

The feature ``item_title_tokens`` (:func:`~data_pipeline.datasets.event_features.text_spec`,
table :data:`~data_pipeline.datasets.event_features.TEXT_TABLE`) holds
:func:`data_pipeline.text.text_ids` of the title without its trailing ``(YYYY)`` (the year is
``year_bucket``); ``item_title_tokens_weights`` holds the idf of each id, from a
:class:`~data_pipeline.text.DocumentFrequency` over every item's title. Titles are static
metadata known for the whole catalogue, so fitting idf on all of them leaks no event. An item
without a title (missing from the movie file) has an empty list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.datasets.event_features import text_spec
from data_pipeline.datasets.movielens_formats import title_without_year
from data_pipeline.schema import FeatureSpec, Side, weights_column
from data_pipeline.text import (
    DocumentFrequency,
    TextHashConfig,
    expected_collisions,
    idf_weight_column,
    text_id_column,
    tokenize,
)

TITLE_TOKENS = "item_title_tokens"


def title_spec() -> FeatureSpec:
    return text_spec(TITLE_TOKENS, Side.ITEM)


@dataclass(frozen=True)
class TitleText:
    """Title ids and idf weights of every item, indexed by dense item id.

    Args:
        ids: ``[I]`` list<int64>, ids in ``[1, config.vocab_size)``.
        weights: ``[I]`` list<float32>, the idf of each id, same row lengths as ``ids``.
        config: how titles were hashed.
        distinct_keys: distinct unigrams and bigrams before hashing.
        distinct_ids: distinct ids after hashing.
    """

    ids: pa.Array
    weights: pa.Array
    config: TextHashConfig
    distinct_keys: int
    distinct_ids: int

    def columns(self) -> dict[str, pa.Array]:
        """``{item_title_tokens: [I], item_title_tokens_weights: [I]}`` for ``items/``."""
        return {TITLE_TOKENS: self.ids, weights_column(TITLE_TOKENS): self.weights}

    def take(self, item_ids: np.ndarray) -> dict[str, pa.Array]:
        """Denormalize: both columns for ``[R]`` dense item ids."""
        indices = pa.array(item_ids, pa.int64())
        return {name: column.take(indices) for name, column in self.columns().items()}

    def to_manifest(self) -> dict[str, Any]:
        return {
            "feature": TITLE_TOKENS,
            "source": "title without the trailing (YYYY) release year",
            "vocab_size": self.config.vocab_size,
            "max_tokens": self.config.max_tokens,
            "bigrams": self.config.bigrams,
            "weights": "idf over all item titles: log((1 + N) / (1 + df)) + 1",
            "distinct_keys": self.distinct_keys,
            "distinct_ids": self.distinct_ids,
            "expected_collisions": expected_collisions(self.distinct_keys, self.config.vocab_size),
        }


def _distinct_keys(texts: list[str], config: TextHashConfig) -> int:
    """Distinct unigram and bigram strings, the keys that hashing may collide."""
    unigrams: set[str] = set()
    bigrams: set[tuple[str, str]] = set()
    for text in texts:
        words = tokenize(text, config.max_tokens)
        unigrams.update(words)
        if config.bigrams:
            bigrams.update(zip(words, words[1:]))
    return len(unigrams) + len(bigrams)


def title_text(titles: list[str], config: TextHashConfig) -> TitleText:
    """Hash ``[I]`` titles (one per dense item, ``""`` if unknown) into ids and idf weights."""
    texts = [title_without_year(title) for title in titles]
    ids = text_id_column(pa.array(texts, pa.string()), config)
    frequency = DocumentFrequency.empty(config.vocab_size).update(ids)
    values = ids.values.to_numpy(zero_copy_only=False)
    return TitleText(
        ids=ids,
        weights=idf_weight_column(ids, frequency.idf()),
        config=config,
        distinct_keys=_distinct_keys(texts, config),
        distinct_ids=int(np.unique(values).size),
    )
