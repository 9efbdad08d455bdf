"""The impression rows of one synthetic feed chunk as an Arrow table: ids, labels, the logged
ranker's position and score, the session's history and impression negatives, and every feature.

Split out of :mod:`data_pipeline.datasets.synthetic`, which simulates the chunks and writes these
tables.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_pipeline.datasets.history import jagged_offsets
from data_pipeline.datasets.synthetic_feature_stream import ChunkFeatures
from data_pipeline.datasets.synthetic_feed import LABELS, FeedChunk
from data_pipeline.datasets.synthetic_world import SyntheticWorld, WorldConfig
from data_pipeline.schema import (
    IMPRESSION_NEGATIVES,
    ITEM_ID,
    POSITION,
    RANKER_SCORE,
    TIMESTAMP,
    USER_ID,
    label_column,
)


def impression_table(
    world: SyntheticWorld,
    config: WorldConfig,
    feed: FeedChunk,
    histories: dict[str, pa.ListArray],
    rows: np.ndarray,
    extra: ChunkFeatures,
) -> pa.Table:
    """Impressions ``rows`` ([R] int64 indices into the chunk) with labels, features, history
    and the extra feature groups of ``extra``."""
    user, item = feed.user[rows], feed.item[rows]
    # Every impression of a session repeats the session's history.
    local_session = pa.array(rows // config.positions)
    columns: dict[str, np.ndarray | pa.Array] = {
        USER_ID: user,
        ITEM_ID: item,
        TIMESTAMP: config.start_timestamp + feed.session[rows] * config.session_interval_s,
        POSITION: feed.position[rows],
        RANKER_SCORE: feed.ranker_score[rows],
    }
    for name in LABELS:
        columns[label_column(name)] = feed.labels[name][rows].astype(np.float32)
    columns[IMPRESSION_NEGATIVES] = session_impression_negatives(feed, config.positions, rows)
    for name, lists in histories.items():
        columns[name] = lists.take(local_session)
    for name, values in world.user_features.items():
        columns[name] = values[user]
    for name, values in world.item_features.items():
        columns[name] = values[item]
    for name, values in extra.per_session.items():
        columns[name] = _take(values, rows // config.positions)
    for name, values in extra.per_row.items():
        columns[name] = _take(values, rows)
    return pa.table(columns)


def _take(values: np.ndarray | pa.Array, index: np.ndarray) -> np.ndarray | pa.Array:
    """``values[index]`` of a numpy array or an Arrow array (``index``: [Q] int64)."""
    return values.take(pa.array(index)) if isinstance(values, pa.Array) else values[index]


def session_impression_negatives(feed: FeedChunk, positions: int, rows: np.ndarray) -> pa.ListArray:
    """Unengaged impressions of each row's own session, in position order.

    Args:
        feed: one chunk, rows in (session, position) order, ``R = S × P`` (the last session
            may be cut short).
        positions: P, slots per session.
        rows: [Q] int64 indices into the chunk.

    Returns:
        Q lists of item ids (list<int64>, possibly empty): the items of the row's session with
        every label 0, excluding the row's own item, jagged ``[sum(lengths)]`` values.
    """
    total = feed.user.shape[0]
    sessions = -(-total // positions)
    # Slots past the end of a cut session count as engaged, so they are never listed.
    engaged = np.ones(sessions * positions, dtype=bool)
    engaged[:total] = np.logical_or.reduce([values != 0 for values in feed.labels.values()])
    slot_items = np.full(sessions * positions, -1, dtype=np.int64)
    slot_items[:total] = feed.item
    slot_items = slot_items.reshape(sessions, positions)
    row_items = feed.item[rows].astype(np.int64)
    session_items = slot_items[rows // positions]  # [Q, P]
    negative = ~engaged.reshape(sessions, positions)[rows // positions]
    negative &= session_items != row_items[:, None]
    offsets = pa.array(jagged_offsets(negative.sum(axis=1)))
    # Row-major boolean selection keeps each row's items in position order.
    return pa.ListArray.from_arrays(offsets, pa.array(session_items[negative]))
