"""One MovieLens copy as a log in dense ids: the parsed ratings with their like/dislike actions,
the side features of every dense id, and the dense id -> raw GroupLens id maps (``raw_ids/``).

Split out of :mod:`data_pipeline.datasets.movielens`, which turns this log into event shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.datasets import movielens_features as features_module
from data_pipeline.datasets.movielens_formats import parse_items, parse_ratings, parse_users
from data_pipeline.datasets.movielens_source import ResolvedSource
from data_pipeline.datasets.output import write_side_file

# Ratings at or below / at or above these are the ``dislike`` / ``like`` actions.
DISLIKE_THRESHOLD = 2.0
LIKE_THRESHOLD = 4.0


@dataclass(frozen=True)
class MovieLensLog:
    """One MovieLens copy in dense ids.

    Args:
        user, item: [N] int64 dense ids.
        timestamp: [N] int64 seconds.
        like: [N] int8, 1 where rating >= 4.
        dislike: [N] int8, 1 where rating <= 2.
        users, items: side features indexed by dense id.
        user_map, item_map: [U], [I] int64 raw id of each dense id.
        item_titles: [I] title of each dense item id (empty when the release has none).
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    like: np.ndarray
    dislike: np.ndarray
    users: features_module.SideFeatures
    items: features_module.SideFeatures
    user_map: np.ndarray
    item_map: np.ndarray
    item_titles: list[str]


def load_log(resolved: ResolvedSource) -> MovieLensLog:
    """Parse the raw files and remap raw ids to dense ``0 .. n-1`` ids."""
    ratings = parse_ratings(resolved.files)
    users = parse_users(resolved.files)
    items = parse_items(resolved.files)
    empty = np.zeros(0, dtype=np.int64)
    user_map = features_module.dense_id_map(ratings.user, users.user if users else empty)
    item_map = features_module.dense_id_map(ratings.item, items.item if items else empty)
    titles = [""] * int(item_map.shape[0])
    if items is not None:
        for row, title in zip(features_module.to_dense(items.item, item_map).tolist(), items.title):
            titles[row] = title
    return MovieLensLog(
        user=features_module.to_dense(ratings.user, user_map),
        item=features_module.to_dense(ratings.item, item_map),
        timestamp=ratings.timestamp,
        like=(ratings.rating >= LIKE_THRESHOLD).astype(np.int8),
        dislike=(ratings.rating <= DISLIKE_THRESHOLD).astype(np.int8),
        users=features_module.user_features(user_map, users),
        items=features_module.item_features(item_map, items),
        user_map=user_map,
        item_map=item_map,
        item_titles=titles,
    )


def write_raw_ids(out: Path, log: MovieLensLog) -> dict[str, dict[str, str]]:
    """``raw_ids/users.parquet`` and ``raw_ids/items.parquet``: dense id -> GroupLens id."""
    users = pa.table(
        {"user_id": np.arange(log.user_map.shape[0], dtype=np.int64), "raw_user_id": log.user_map}
    )
    items = pa.table(
        {
            "item_id": np.arange(log.item_map.shape[0], dtype=np.int64),
            "raw_item_id": log.item_map,
            "title": pa.array(log.item_titles, type=pa.string()),
        }
    )
    return {
        "users": write_side_file(out, "raw_ids/users.parquet", users),
        "items": write_side_file(out, "raw_ids/items.parquet", items),
    }
