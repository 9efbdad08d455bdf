"""Arrow record batches -> ``Batch``: KeyedJaggedTensors for each tower plus dense tensors.

Conversion is vectorized per column (numpy views of Arrow buffers, no per-row Python loop).
Feature names here are the ``KeyedJaggedTensor`` keys and match the embedding configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import KeyedJaggedTensor

from data_pipeline.derived import add_derived_columns
from data_pipeline.feature_encoding import FeatureEncoding, encode_kjt, needs_weights
from data_pipeline.schema import (
    IMPRESSION_NEGATIVES,
    ITEM_ID,
    POSITION,
    RANKER_SCORE,
    TIMESTAMP,
    USER_ID,
    EventSchema,
    FeatureSpec,
    SchemaError,
    label_column,
)
from data_pipeline.tensor_pack import TensorSpec, from_payload, pack, to_payload, unpack


@dataclass
class Batch:
    """One batch of B logged events.

    Args:
        user_features: KJT with one key per user-side feature (stride B).
        item_features: KJT with one key per item-side feature (stride B).
        labels: [B, T] float32 reward labels in ``manifest.labels`` order.
        position: [B] int64 feed position, -1 where unknown.
        user_ids: [B] int64.
        item_ids: [B] int64 (accidental-hit masking, evaluation targets).
        ranker_score: [B] float32 logged ranker score, NaN where unknown.
        impression_negatives: [B, K] int64 item ids shown with the row's item and not engaged,
            the first K of ``impression_negative_ids``, -1 padded; [B, 0] when K = 0.
        weight: [B] float32 row multiplier; 0 marks padding rows that must not teach.
        timestamp: [B] int64 event time (seconds), -1 where the table has none.
        window_targets: sequence mode (:mod:`data_pipeline.sequence_windows`): [W] int64,
            the number of rows each of the W windows of ``user_features`` (stride W) owns, in
            order (B = their sum); [0] for one logged event per row.
    """

    user_features: KeyedJaggedTensor
    item_features: KeyedJaggedTensor
    labels: torch.Tensor
    position: torch.Tensor
    user_ids: torch.Tensor
    item_ids: torch.Tensor
    ranker_score: torch.Tensor
    impression_negatives: torch.Tensor
    weight: torch.Tensor
    timestamp: torch.Tensor
    window_targets: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def size(self) -> int:
        return int(self.user_ids.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device=device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __reduce__(self) -> tuple:
        """Pickles as one packed buffer (:mod:`data_pipeline.tensor_pack`): a loader worker
        hands the batch to the trainer by value (small) or in one shared-memory transfer, not
        one per tensor."""
        tensors: list[torch.Tensor] = []
        sides = []
        for features in (getattr(self, name) for name in KJT_FIELDS):
            weights = features.weights_or_none()
            tensors += [features.values(), features.lengths()]
            tensors += [] if weights is None else [weights]
            sides.append((list(features.keys()), features.stride(), weights is not None))
        dense = [getattr(self, name) for name in DENSE_FIELDS]
        buffer, specs = pack([t.cpu() for t in [*tensors, *dense]])
        return (_unpickle_batch, (to_payload(buffer), specs, sides))

    def as_padding(self) -> Batch:
        """The same rows with zero weight: keeps collectives in step when this rank is out of
        data while others still train, without teaching the model anything."""
        return replace(self, weight=torch.zeros_like(self.weight))


KJT_FIELDS = ("user_features", "item_features")
DENSE_FIELDS = tuple(f.name for f in fields(Batch) if f.name not in KJT_FIELDS)


def _unpickle_batch(
    payload: torch.Tensor | np.ndarray,
    specs: list[TensorSpec],
    sides: list[tuple[list[str], int, bool]],
) -> Batch:
    """The inverse of ``Batch.__reduce__``: views into the one buffer."""
    tensors = iter(unpack(from_payload(payload), specs))
    kjts = []
    for keys, stride, weighted in sides:
        values, lengths = next(tensors), next(tensors)
        weights = next(tensors) if weighted else None
        kjts.append(
            KeyedJaggedTensor(
                keys=keys, values=values, lengths=lengths, weights=weights, stride=stride
            )
        )
    dense = {name: next(tensors) for name in DENSE_FIELDS}
    return Batch(**dict(zip(KJT_FIELDS, kjts)), **dense)


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)


def padded_list_head(table: pa.Table, name: str, width: int) -> np.ndarray:
    """The first ``width`` values of each row of a list<int> column, -1 padded.

    Returns:
        [B, width] int64.

    Raises:
        SchemaError: naming the column, when it holds null values inside its lists.
    """
    column = table.column(name).combine_chunks()
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(column)
    if flat.null_count:
        raise SchemaError(f"column '{name}' has {flat.null_count} null values inside its lists")
    values = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    lengths = lengths.astype(np.int64, copy=False)
    taken = np.minimum(lengths, width)
    row = np.repeat(np.arange(lengths.shape[0]), taken)
    slot = np.arange(row.shape[0]) - np.repeat(np.cumsum(taken) - taken, taken)
    out = np.full((lengths.shape[0], width), -1, dtype=np.int64)
    out[row, slot] = values[np.repeat(np.cumsum(lengths) - lengths, taken) + slot]
    return out


def build_kjt(
    table: pa.Table,
    features: tuple[FeatureSpec, ...],
    encoding: FeatureEncoding | None = None,
    weighted: bool | None = None,
) -> KeyedJaggedTensor:
    """KJT over ``features`` in order; a feature absent from ``table`` gets zero lengths (used
    when only one tower's columns are read, e.g. the item corpus). Weights ride along when
    ``weighted`` (default: when ``features`` has a weighted feature or a counter)."""
    return encode_kjt(
        table,
        features,
        encoding or FeatureEncoding(),
        needs_weights(features) if weighted is None else weighted,
    )


@dataclass(frozen=True)
class BatchBuilder:
    """Turns an Arrow table of events (or of items) into a ``Batch``.

    Args:
        schema: the model-facing schema (stored plus derived features).
        recent_history: length of the derived newest-items feature (0: not derived).
        impression_negatives: K, impression hard negatives kept per row (0: none; the table
            then need not have ``impression_negative_ids``).
        recency_buckets: buckets of the derived ``hist_recency`` feature (<= 0: not derived).
        encoding: counter statistics and weight normalization
            (:mod:`data_pipeline.feature_encoding`).
    """

    schema: EventSchema
    recent_history: int = 0
    impression_negatives: int = 0
    recency_buckets: int = 0
    encoding: FeatureEncoding = field(default_factory=FeatureEncoding)

    @property
    def weighted(self) -> bool:
        """Whether both KJTs carry weights (one rule for both sides, so they concatenate)."""
        return needs_weights(self.schema.features)

    def __post_init__(self) -> None:
        if self.impression_negatives < 0:
            raise ValueError(
                f"BatchBuilder: impression_negatives must be >= 0, got {self.impression_negatives}"
            )

    def __call__(self, table: pa.Table) -> Batch:
        rows = table.num_rows
        table = add_derived_columns(table, self.recent_history, self.recency_buckets)
        names = set(table.column_names)
        if all(label_column(x) in names for x in self.schema.labels):
            labels = np.stack(
                [_column_numpy(table, label_column(x)) for x in self.schema.labels], axis=1
            ).astype(np.float32, copy=False)
        else:
            labels = np.zeros((rows, len(self.schema.labels)), dtype=np.float32)
        if POSITION in names:
            position = pc.fill_null(table.column(POSITION), -1).to_numpy().astype(np.int64)
        else:
            position = np.full(rows, -1, dtype=np.int64)
        if RANKER_SCORE in names:
            # Nulls become NaN ("unknown") through the float conversion.
            ranker = table.column(RANKER_SCORE).to_numpy(zero_copy_only=False).astype(np.float32)
        else:
            ranker = np.full(rows, np.nan, dtype=np.float32)
        user_ids, timestamp = (
            _column_numpy(table, name).astype(np.int64)
            if name in names
            else np.full(rows, -1, dtype=np.int64)
            for name in (USER_ID, TIMESTAMP)
        )
        return Batch(
            user_features=build_kjt(
                table, self.schema.user_features(), self.encoding, self.weighted
            ),
            item_features=build_kjt(
                table, self.schema.item_features(), self.encoding, self.weighted
            ),
            labels=torch.from_numpy(np.ascontiguousarray(labels)),
            position=torch.from_numpy(position),
            user_ids=torch.from_numpy(user_ids),
            item_ids=torch.from_numpy(_column_numpy(table, ITEM_ID).astype(np.int64)),
            ranker_score=torch.from_numpy(np.ascontiguousarray(ranker, dtype=np.float32)),
            impression_negatives=torch.from_numpy(self._impression_negatives(table)),
            weight=torch.ones(rows, dtype=torch.float32),
            timestamp=torch.from_numpy(timestamp),
        )

    def user_features(self, table: pa.Table) -> KeyedJaggedTensor:
        """The user-side KJT (stride B) of B rows holding user columns (events, or user rows
        for serving), built as ``__call__`` builds it.

        Raises:
            SchemaError: naming the user feature columns the table lacks.
        """
        table = add_derived_columns(table, self.recent_history, self.recency_buckets)
        features = self.schema.user_features()
        missing = [f.name for f in features if f.name not in table.column_names]
        if missing:
            raise SchemaError(
                f"missing user feature column(s) {missing}; found columns {table.column_names}"
            )
        return build_kjt(table, features, self.encoding, self.weighted)

    def _impression_negatives(self, table: pa.Table) -> np.ndarray:
        """[B, K] int64, -1 padded; [B, 0] when K = 0."""
        if self.impression_negatives == 0:
            return np.zeros((table.num_rows, 0), dtype=np.int64)
        if IMPRESSION_NEGATIVES not in table.column_names:
            raise SchemaError(
                f"missing column '{IMPRESSION_NEGATIVES}' needed for impression_negatives="
                f"{self.impression_negatives}; found columns {table.column_names} (the dataset "
                "has no logged impressions, or it was prepared before the column existed)"
            )
        return padded_list_head(table, IMPRESSION_NEGATIVES, self.impression_negatives)
