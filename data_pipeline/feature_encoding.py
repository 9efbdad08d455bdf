"""Arrow feature columns -> one ``KeyedJaggedTensor`` per side, with per-id weights.

Weights ride in the KJT whenever the feature set has a weighted feature or a counter (the KJT then
has one weight per value for every key, 1 where a feature has none), because TorchRec carries
per-id scores as ``KeyedJaggedTensor.weights()``:

* ``ids`` feature with ``<f>_weights`` (text idf, topic affinity): the stored weights, or 1 when
  the model does not use them; divided by their row sum when the feature is mean-pooled through a
  weighted table (the table itself sums, so the result is a weighted mean).
* ``counter`` feature: one value per row, the bucket id :func:`~data_pipeline.counters.counter_bucket`
  of the count, with weight ``(log1p(count) - mean) / std`` (statistics from the manifest). The
  model embeds the bucket id and reads the weight as a dense input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import KeyedJaggedTensor

from data_pipeline.counters import CounterStatistics, counter_bucket
from data_pipeline.schema import FeatureKind, FeatureSpec, SchemaError, weights_column


@dataclass(frozen=True)
class FeatureEncoding:
    """How weights and counters become KJT values.

    Args:
        counter_stats: counter name -> (mean, std) of ``log1p(count)`` on the train split.
        counter_buckets: counter name -> rows of its bucket table.
        mean_weighted: features whose weights are divided by their row sum (mean pooling
            through a weighted, sum-pooled table).
        dropout: feature -> p, the share of rows (training batches only) whose bag is emptied,
            so the tower learns to embed an item (or user) from its other features, as it must
            for a cold one. Which rows is a pure function of (user_id, item_id, timestamp,
            feature, ``dropout_seed``), so runs and resumes agree.
        dropout_seed: seed of the row choice.
    """

    counter_stats: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    counter_buckets: Mapping[str, int] = field(default_factory=dict)
    mean_weighted: frozenset[str] = frozenset()
    dropout: Mapping[str, float] = field(default_factory=dict)
    dropout_seed: int = 0

    @staticmethod
    def from_manifest(
        counters: Mapping[str, Mapping[str, object]],
        tables: Mapping[str, int],
        features: Sequence[FeatureSpec],
        mean_weighted: frozenset[str] = frozenset(),
    ) -> FeatureEncoding:
        """Statistics of every counter among ``features`` (``manifest.counters``).

        Raises:
            SchemaError: a counter has no statistics or no bucket table in the manifest.
        """
        stats = CounterStatistics.from_manifest(counters)
        out: dict[str, tuple[float, float]] = {}
        buckets: dict[str, int] = {}
        for feature in features:
            if feature.kind is not FeatureKind.COUNTER:
                continue
            if feature.name not in stats.moments:
                raise SchemaError(
                    f"counter '{feature.name}' has no normalization statistics in the manifest "
                    f"(manifest.counters has {sorted(stats.moments)}); prepare the data again"
                )
            if feature.table not in tables:
                raise SchemaError(f"counter '{feature.name}': no table '{feature.table}'")
            moments = stats.moments[feature.name]
            out[feature.name] = (moments.mean, moments.std if moments.std >= 1e-6 else 1.0)
            buckets[feature.name] = int(tables[feature.table])
        return FeatureEncoding(out, buckets, mean_weighted)


def needs_weights(features: Sequence[FeatureSpec]) -> bool:
    """Whether KJTs over ``features`` carry weights (a weighted feature or a counter)."""
    return any(f.weighted or f.kind is FeatureKind.COUNTER for f in features)


def _lengths_values(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, pa.Array]:
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(array)
    if flat.null_count:
        raise SchemaError(f"column '{name}' has {flat.null_count} null values inside its lists")
    return lengths.astype(np.int64, copy=False), flat


def _row_normalized(weights: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[V] weights divided by their row's sum (rows given by [B] lengths; a zero sum stays 0)."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    sums = np.bincount(rows, weights=weights, minlength=len(lengths))
    safe = np.where(sums > 0, sums, 1.0)
    return (weights / safe[rows]).astype(np.float32)


@dataclass(frozen=True)
class EncodedFeature:
    """values [V] int64, lengths [B] int64, weights [V] float32 of one feature."""

    values: np.ndarray
    lengths: np.ndarray
    weights: np.ndarray


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)


def _row_uniforms(table: pa.Table, feature: str, seed: int) -> np.ndarray:
    """[B] uniforms in [0, 1) from each row's (user_id, item_id, timestamp) and ``feature``,
    ``seed`` (splitmix64 finalizer): the same row always draws the same number."""
    salt = int.from_bytes(feature.encode()[:8].ljust(8, b"\0"), "little")
    start = (seed * _MIX[3] ^ salt) & 0xFFFFFFFFFFFFFFFF
    mixed = np.full(table.num_rows, start, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column, constant in zip(("user_id", "item_id", "timestamp"), _MIX[:3], strict=True):
            if column in table.column_names:
                values = table.column(column).to_numpy(zero_copy_only=False).astype(np.int64)
                mixed ^= values.astype(np.uint64) * np.uint64(constant)
                mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(_MIX[1])
                mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(_MIX[2])
                mixed ^= mixed >> np.uint64(31)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _drop_rows(encoded: EncodedFeature, dropped: np.ndarray) -> EncodedFeature:
    """The same feature with the bags of ``dropped`` ([B] bool) rows emptied."""
    keep = np.repeat(~dropped, encoded.lengths)
    return EncodedFeature(
        encoded.values[keep], np.where(dropped, 0, encoded.lengths), encoded.weights[keep]
    )


def encode_feature(
    table: pa.Table, feature: FeatureSpec, encoding: FeatureEncoding
) -> EncodedFeature:
    """One feature column of ``table`` (absent: empty bags) as jagged values and weights, with
    the feature's training dropout applied."""
    encoded = _encode(table, feature, encoding)
    rate = encoding.dropout.get(feature.name, 0.0)
    if rate <= 0 or feature.name not in table.column_names:
        return encoded
    return _drop_rows(encoded, _row_uniforms(table, feature.name, encoding.dropout_seed) < rate)


def _encode(table: pa.Table, feature: FeatureSpec, encoding: FeatureEncoding) -> EncodedFeature:
    """The feature's values, lengths and weights, before dropout."""
    rows = table.num_rows
    if feature.name not in table.column_names:
        empty = np.zeros(0, dtype=np.int64)
        return EncodedFeature(empty, np.zeros(rows, np.int64), np.zeros(0, np.float32))
    column = table.column(feature.name)
    if feature.kind is FeatureKind.COUNTER:
        counts = column.combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64)
        if len(counts) and counts.min() < 0:
            raise SchemaError(f"counter column '{feature.name}' has negative counts")
        if feature.name not in encoding.counter_stats:
            raise SchemaError(
                f"counter '{feature.name}': no normalization statistics given (build the "
                "encoding with FeatureEncoding.from_manifest)"
            )
        mean, std = encoding.counter_stats[feature.name]
        dense = ((np.log1p(counts.astype(np.float64)) - mean) / std).astype(np.float32)
        bucket = counter_bucket(counts, encoding.counter_buckets[feature.name])
        return EncodedFeature(bucket, np.ones(rows, np.int64), dense)
    if feature.kind is FeatureKind.ID:
        values = column.combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64)
        return EncodedFeature(values, np.ones(rows, np.int64), np.ones(rows, np.float32))
    lengths, flat = _lengths_values(column, feature.name)
    values = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    weights = np.ones(len(values), dtype=np.float32)
    if feature.weighted:
        name = weights_column(feature.name)
        if name not in table.column_names:
            raise SchemaError(
                f"missing weights column '{name}' of weighted feature '{feature.name}'"
            )
        weight_lengths, weight_flat = _lengths_values(table.column(name), name)
        if not np.array_equal(weight_lengths, lengths):
            bad = int(np.argmax(weight_lengths != lengths))
            raise SchemaError(
                f"column '{name}' is not aligned with '{feature.name}': row {bad} has "
                f"{weight_lengths[bad]} weights for {lengths[bad]} ids"
            )
        weights = weight_flat.to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isfinite(weights).all():
            raise SchemaError(f"column '{name}' has non-finite weights")
    if feature.name in encoding.mean_weighted:
        weights = _row_normalized(weights.astype(np.float64), lengths)
    return EncodedFeature(values, lengths, weights)


def encode_kjt(
    table: pa.Table,
    features: Sequence[FeatureSpec],
    encoding: FeatureEncoding,
    weighted: bool,
) -> KeyedJaggedTensor:
    """KJT over ``features`` in order (stride = rows); a feature absent from ``table`` gets empty
    bags (e.g. the item corpus holds no user columns). ``weighted``: attach weights (see the
    module docstring); else the KJT has none."""
    parts = [encode_feature(table, f, encoding) for f in features]

    def cat(arrays: list[np.ndarray], dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, dtype))

    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features],
        values=cat([p.values for p in parts], np.int64),
        lengths=cat([p.lengths for p in parts], np.int64),
        weights=cat([p.weights for p in parts], np.float32) if weighted else None,
    )
