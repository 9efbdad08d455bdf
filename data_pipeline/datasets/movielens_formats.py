"""Parse the raw MovieLens file layouts into one in-memory form (raw ids, raw strings).

Ratings go through ``pyarrow.csv`` (vectorized; ml-32m has 32M rows); the user and movie files
are small and parsed line by line. The GroupLens ``.dat`` and ml-100k item files are latin-1.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from data_pipeline.datasets.movielens_source import RawFiles

# ml-100k's u.genre, in the order of u.item's 19 genre flags.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
UNKNOWN_GENRES = frozenset({"unknown", "(no genres listed)", ""})
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")
_TRAILING_YEAR = re.compile(r"(\d{4})$")


@dataclass(frozen=True)
class RawRatings:
    """Args:
    user: [N] int64 raw user ids.
    item: [N] int64 raw movie ids.
    rating: [N] float32 stars (half stars in ml-10m+).
    timestamp: [N] int64 seconds.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray


@dataclass(frozen=True)
class RawUsers:
    """Args:
    user: [U] int64 raw user ids.
    age: [U] int64 age in years or ml-1m age code (same bucket edges); -1 unknown.
    gender, occupation, zip_code: U raw strings, "" unknown.
    """

    user: np.ndarray
    age: np.ndarray
    gender: list[str]
    occupation: list[str]
    zip_code: list[str]


@dataclass(frozen=True)
class RawItems:
    """Args:
    item: [I] int64 raw movie ids.
    title: I titles.
    year: [I] int64 release year, -1 unknown.
    genres: I lists of genre names (unknown markers removed).
    """

    item: np.ndarray
    title: list[str]
    year: np.ndarray
    genres: list[list[str]]


def parse_ratings(files: RawFiles) -> RawRatings:
    names = ["user", "item", "rating", "timestamp"]
    data, delimiter, skip = files.ratings, "\t", 0
    if files.layout == "dat":
        data = data.replace(b"::", b"\t")
    elif files.layout == "csv":
        delimiter, skip = ",", 1
    elif files.layout == "recbole":
        skip = 1
    table = pa_csv.read_csv(
        io.BytesIO(data),
        read_options=pa_csv.ReadOptions(column_names=names, skip_rows=skip),
        parse_options=pa_csv.ParseOptions(delimiter=delimiter),
        convert_options=pa_csv.ConvertOptions(
            column_types={
                "user": pa.int64(),
                "item": pa.int64(),
                "rating": pa.float32(),
                # RecBole types timestamps as float; their values are whole seconds.
                "timestamp": pa.float64() if files.layout == "recbole" else pa.int64(),
            }
        ),
    )
    return RawRatings(
        user=table["user"].to_numpy().astype(np.int64),
        item=table["item"].to_numpy().astype(np.int64),
        rating=table["rating"].to_numpy().astype(np.float32),
        timestamp=table["timestamp"].to_numpy().astype(np.int64),
    )


def parse_users(files: RawFiles) -> RawUsers | None:
    if files.users is None:
        return None
    text = decode_text(files.users)
    rows: list[tuple[str, str, str, str, str]] = []  # id, age, gender, occupation, zip
    for line in text.splitlines()[1 if files.layout == "recbole" else 0 :]:
        if not line.strip():
            continue
        if files.layout == "ml-100k":
            user, age, gender, occupation, zip_code = line.split("|")[:5]
        elif files.layout == "dat":
            user, gender, age, occupation, zip_code = line.split("::")[:5]
        elif files.layout == "recbole":
            user, age, gender, occupation, zip_code = line.split("\t")[:5]
        else:  # no GroupLens csv release has a user file
            return None
        rows.append((user, age, gender, occupation, zip_code))
    return RawUsers(
        user=np.array([int(r[0]) for r in rows], dtype=np.int64),
        age=np.array([int(r[1]) if r[1].strip().isdigit() else -1 for r in rows], dtype=np.int64),
        gender=[r[2].strip() for r in rows],
        occupation=[r[3].strip() for r in rows],
        zip_code=[r[4].strip() for r in rows],
    )


def parse_items(files: RawFiles) -> RawItems | None:
    if files.items is None:
        return None
    if files.layout == "csv":
        reader = csv.reader(io.StringIO(files.items.decode("utf-8")))
        next(reader, None)
        rows = [(r[0], r[1], _title_year(r[1]), r[2].split("|")) for r in reader if r]
    else:
        rows = [_item_row(files.layout, line) for line in _item_lines(files)]
    return RawItems(
        item=np.array([int(r[0]) for r in rows], dtype=np.int64),
        title=[r[1] for r in rows],
        year=np.array([r[2] for r in rows], dtype=np.int64),
        genres=[[g for g in r[3] if g not in UNKNOWN_GENRES] for r in rows],
    )


def _item_lines(files: RawFiles) -> list[str]:
    assert files.items is not None
    lines = decode_text(files.items).splitlines()
    return [line for line in lines[1 if files.layout == "recbole" else 0 :] if line.strip()]


def _item_row(layout: str, line: str) -> tuple[str, str, int, list[str]]:
    if layout == "ml-100k":
        fields = line.split("|")
        flags = fields[5 : 5 + len(ML100K_GENRES)]
        genres = [g for g, flag in zip(ML100K_GENRES, flags) if flag.strip() == "1"]
        match = _TRAILING_YEAR.search(fields[2].strip())
        year = int(match.group(1)) if match else _title_year(fields[1])
        return fields[0], fields[1], year, genres
    if layout == "dat":
        item, title, genres_text = line.split("::")[:3]
        return item, title, _title_year(title), genres_text.split("|")
    # recbole: item_id, movie_title, release_year, class (space-separated genres)
    item, title, year_text, genres_text = line.split("\t")[:4]
    year = int(year_text) if year_text.strip().isdigit() else -1
    return item, title, year, genres_text.split()


def decode_text(data: bytes) -> str:
    """UTF-8 (RecBole, ml-20m+) or latin-1 (the older GroupLens releases)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _title_year(title: str) -> int:
    match = _TITLE_YEAR.search(title)
    return int(match.group(1)) if match else -1


def title_without_year(title: str) -> str:
    """``"Toy Story (1995)"`` -> ``"Toy Story"``: the release year is the ``year_bucket``
    feature already, so title text leaves it out (the same trailing ``(YYYY)`` it is parsed from)."""
    return _TITLE_YEAR.sub("", title).rstrip()
