"""Derived batch-time features: recency buckets and the history encoder's per-event features."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.derived import (
    RECENCY,
    add_derived_columns,
    history_feature_tables,
    recency_bucket,
    with_derived_features,
)
from data_pipeline.schema import SchemaError
from tests.tiny_dataset import SCHEMA

HOUR = 3600


def test_recency_bucket_edges_in_hours() -> None:
    ages = np.array([-5, 0, HOUR - 1, HOUR, 3 * HOUR - 1, 3 * HOUR, 7 * HOUR, 10**10])
    assert recency_bucket(ages, 5).tolist() == [0, 0, 0, 1, 1, 2, 3, 4]
    assert recency_bucket(ages, 1).tolist() == [0] * len(ages)


def test_recency_bucket_matches_formula_and_is_monotone() -> None:
    ages = np.arange(-100, 50 * 24 * HOUR, 997)
    buckets = recency_bucket(ages, 16)
    assert (np.diff(buckets) >= 0).all()
    expected = [min(max(math.floor(math.log2(1 + max(a, 0) / HOUR)), 0), 15) for a in ages[::50]]
    assert buckets[::50].tolist() == expected


def test_recency_column_is_aligned_with_history() -> None:
    table = pa.table(
        {
            "timestamp": [10 * HOUR, 5 * HOUR],
            "hist_item_ids": pa.array([[3, 2, 1], []], pa.list_(pa.int64())),
            "hist_timestamps": pa.array([[10 * HOUR - 5, 9 * HOUR, 2 * HOUR], []]),
        }
    )
    derived = add_derived_columns(table, 0, recency_buckets=8)
    assert derived.column(RECENCY).to_pylist() == [[0, 1, 3], []]  # ages 5 s, 1 h, 8 h
    with pytest.raises(SchemaError, match="hist_timestamps"):
        add_derived_columns(table.drop_columns(["hist_timestamps"]), 0, recency_buckets=8)


def test_history_features_join_the_schema() -> None:
    assert history_feature_tables(SCHEMA, 8) == {"hist_like": 2}  # tiny data has no timestamps
    with_features = with_derived_features(SCHEMA, 0, 8)
    added = [f for f in with_features.features if f not in SCHEMA.features]
    assert [(f.name, f.table) for f in added] == [("hist_like", "hist_like")]
    assert with_derived_features(SCHEMA, 0, -1) == SCHEMA
