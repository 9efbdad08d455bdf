"""MovieLens raw ids and attributes -> dense embedding-table ids.

``user_id`` and ``item_id`` are dense ``0 .. n-1`` in raw-id order, nothing reserved. Categorical
side features reserve id 0 for "unknown" (a user missing from the user file, an unparsable year):

==============  ======  ===============================================================
feature         table   ids
==============  ======  ===============================================================
``gender``      3       0 unknown, 1 F, 2 M
``age_bucket``  8       0 unknown, 1..7 for the ml-1m age groups <18, 18, 25, 35, 45, 50, 56+
``occupation``  K + 1   0 unknown, 1..K in sorted order of the raw values
``zip_prefix``  12      0 unknown, 1..10 for a leading digit 0..9, 11 for any other (non-US)
``genres``      G + 1   bag of ids; 1..G in sorted genre-name order, [0] if none known
``year_bucket`` 24      0 unknown, 1 before 1920, then 5-year buckets 1920-24 .. 2025+
==============  ======  ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from data_pipeline.datasets.movielens_formats import RawItems, RawUsers

UNKNOWN = 0
GENDERS = ("F", "M")
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
ZIP_OTHER = 11
ZIP_TABLE_SIZE = 12
FIRST_YEAR = 1920
YEAR_BUCKET_YEARS = 5
YEAR_TABLE_SIZE = 24


@dataclass
class SideFeatures:
    """Feature columns of one side, indexed by dense id.

    Args:
        columns: feature name -> [n] int64 ids, or a list<int64> Arrow array of length n.
        table_sizes: feature (= table) name -> rows of its embedding table.
        vocabularies: feature name -> raw value of each id, for the manifest.
    """

    columns: dict[str, np.ndarray | pa.Array] = field(default_factory=dict)
    table_sizes: dict[str, int] = field(default_factory=dict)
    vocabularies: dict[str, list[str]] = field(default_factory=dict)

    def take(self, dense_ids: np.ndarray) -> dict[str, np.ndarray | pa.Array]:
        """Denormalize: the feature values of ``dense_ids`` ([R] int64), column by column."""
        taken: dict[str, np.ndarray | pa.Array] = {}
        for name, column in self.columns.items():
            if isinstance(column, np.ndarray):
                taken[name] = column[dense_ids]
            else:
                taken[name] = column.take(pa.array(dense_ids))
        return taken


def dense_id_map(*raw_id_arrays: np.ndarray) -> np.ndarray:
    """Sorted unique raw ids; the dense id of a raw id is its index ([n] int64)."""
    return np.unique(np.concatenate([a.astype(np.int64) for a in raw_id_arrays]))


def to_dense(raw_ids: np.ndarray, id_map: np.ndarray) -> np.ndarray:
    """[R] raw ids -> [R] int64 dense ids (every raw id must be in ``id_map``)."""
    return np.searchsorted(id_map, raw_ids).astype(np.int64)


def vocabulary_ids(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Raw strings -> ids ``1..K`` in sorted order (numbers numerically), "" -> 0."""
    known = sorted(
        {v for v in values if v}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)
    )
    index = {v: i + 1 for i, v in enumerate(known)}
    return np.array([index.get(v, UNKNOWN) for v in values], dtype=np.int64), ["<unknown>"] + known


def age_bucket(age: np.ndarray) -> np.ndarray:
    """[n] ages in years (or ml-1m age codes), -1 unknown -> [n] int64 bucket ids 0..7."""
    return np.where(age < 0, UNKNOWN, np.searchsorted(AGE_EDGES, age, side="right") + 1)


def zip_prefix(zip_code: str) -> int:
    if not zip_code:
        return UNKNOWN
    return 1 + int(zip_code[0]) if zip_code[0].isdigit() else ZIP_OTHER


def year_bucket(year: np.ndarray) -> np.ndarray:
    """[n] release years, -1 unknown -> [n] int64 bucket ids 0..23."""
    bucket = 2 + (year - FIRST_YEAR) // YEAR_BUCKET_YEARS
    bucket = np.clip(bucket, 1, YEAR_TABLE_SIZE - 1)
    return np.where(year < 0, UNKNOWN, bucket).astype(np.int64)


def user_features(user_map: np.ndarray, users: RawUsers | None) -> SideFeatures:
    """``user_id`` plus, where a user file exists, gender, age, occupation and zip prefix."""
    n = int(user_map.shape[0])
    features = SideFeatures(
        columns={"user_id": np.arange(n, dtype=np.int64)}, table_sizes={"user_id": n}
    )
    if users is None:
        return features
    rows = to_dense(users.user, user_map)
    occupation, occupation_vocabulary = vocabulary_ids(users.occupation)
    per_user = {
        "gender": np.array([GENDERS.index(g) + 1 if g in GENDERS else 0 for g in users.gender]),
        "age_bucket": age_bucket(users.age),
        "occupation": occupation,
        "zip_prefix": np.array([zip_prefix(z) for z in users.zip_code]),
    }
    for name, values in per_user.items():
        column = np.zeros(n, dtype=np.int64)
        column[rows] = values
        features.columns[name] = column
    features.table_sizes.update(
        gender=len(GENDERS) + 1,
        age_bucket=len(AGE_EDGES) + 2,
        occupation=len(occupation_vocabulary),
        zip_prefix=ZIP_TABLE_SIZE,
    )
    features.vocabularies.update(
        gender=["<unknown>", *GENDERS],
        age_bucket=["<unknown>", "<18"] + [f"{a}+" for a in AGE_EDGES],
        occupation=occupation_vocabulary,
    )
    return features


def item_features(item_map: np.ndarray, items: RawItems | None) -> SideFeatures:
    """``item_id``, ``genres`` (bag of genre ids) and ``year_bucket`` for every dense item."""
    n = int(item_map.shape[0])
    genre_lists: list[list[str]] = [[] for _ in range(n)]
    year = np.full(n, -1, dtype=np.int64)
    if items is not None:
        rows = to_dense(items.item, item_map)
        year[rows] = items.year
        for row, genres in zip(rows.tolist(), items.genres):
            genre_lists[row] = genres
    vocabulary = sorted({g for genres in genre_lists for g in genres})
    index = {g: i + 1 for i, g in enumerate(vocabulary)}
    genre_ids = [sorted(index[g] for g in set(genres)) or [UNKNOWN] for genres in genre_lists]
    return SideFeatures(
        columns={
            "item_id": np.arange(n, dtype=np.int64),
            "genres": pa.array(genre_ids, type=pa.list_(pa.int64())),
            "year_bucket": year_bucket(year),
        },
        table_sizes={"item_id": n, "genres": len(vocabulary) + 1, "year_bucket": YEAR_TABLE_SIZE},
        vocabularies={"genres": ["<unknown>", *vocabulary]},
    )
