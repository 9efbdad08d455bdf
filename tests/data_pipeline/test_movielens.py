"""MovieLens conversion: tiny hand-written sources in every layout, leakage, splits, checksums,
and the real offline ml-100k copy from the recbole wheel."""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.datasets import movielens_source
from data_pipeline.datasets.movielens import prepare_movielens
from data_pipeline.datasets.movielens_source import (
    RECBOLE_WHEEL,
    SourceError,
    combined_sha256,
    default_cache_dir,
    recbole_wheel,
)
from data_pipeline.manifest import Manifest, sha256_file

HISTORY = 3
# user | age | gender | occupation | zip; raw user 5 rates but is missing from u.user.
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|15|M|student|T8H1N\n4|33|F|writer|\n"
FLAGS = {"unknown": 0, "Action": 1, "Adventure": 2, "Comedy": 5, "Drama": 8, "Sci-Fi": 15}


def item_line(raw_id: int, title: str, date: str, genres: list[str]) -> str:
    flags = ["0"] * 19
    for genre in genres:
        flags[FLAGS[genre]] = "1"
    return f"{raw_id}|{title}|{date}||http://example|{'|'.join(flags)}\n"


U_ITEM = "".join(
    [
        item_line(1, "Toy Story (1995)", "01-Jan-1995", ["Comedy"]),
        item_line(2, "GoldenEye (1995)", "01-Jan-1995", ["Action", "Adventure"]),
        item_line(3, "Café au lait (1994)", "01-Jan-1994", ["Drama"]),
        item_line(4, "unknown", "", ["unknown"]),
        item_line(5, "Metropolis (1927)", "01-Jan-1927", ["Drama", "Sci-Fi"]),
        item_line(6, "Nosferatu (1918)", "01-Jan-1918", ["Drama"]),
    ]
)
# user, item, rating, timestamp: ties on purpose (user 1 at t=300, user 2 at t=200).
U_DATA = [
    (1, 1, 5, 100), (1, 2, 3, 200), (1, 6, 4, 300), (1, 3, 2, 300), (1, 5, 4, 400),
    (2, 4, 1, 100), (2, 2, 5, 200), (2, 1, 4, 200), (2, 3, 3, 250),
    (3, 1, 4, 500), (3, 5, 5, 600),
    (4, 6, 2, 50), (4, 2, 4, 60), (4, 1, 3, 70),
    (5, 3, 4, 10), (5, 4, 1, 20), (5, 5, 5, 30), (5, 2, 2, 40),
]  # fmt: skip


def write_ml100k(
    folder: Path, data: list[tuple[int, int, int, int]], side_files: bool = True
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in data))
    if side_files:
        (folder / "u.user").write_text(U_USER)
        (folder / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    return folder


def read_split(out: Path, split: str) -> pa.Table:
    return pq.read_table(out / split)


def raw_events(out: Path) -> list[dict]:
    """All event rows with raw user/item ids restored from ``raw_ids/``."""
    users = pq.read_table(out / "raw_ids" / "users.parquet")["raw_user_id"].to_numpy()
    items = pq.read_table(out / "raw_ids" / "items.parquet")["raw_item_id"].to_numpy()
    rows = []
    for split in ("train", "valid", "test"):
        for row in read_split(out, split).to_pylist():
            row["split"] = split
            row["raw_user"] = int(users[row["user_id"]])
            row["raw_item"] = int(items[row["item_id"]])
            row["raw_history"] = [int(items[i]) for i in row["hist_item_ids"]]
            rows.append(row)
    return rows


def test_tiny_ml100k_folder(tmp_path: Path) -> None:
    source = write_ml100k(tmp_path / "ml-100k", U_DATA)
    out = tmp_path / "out"
    manifest = prepare_movielens("100k", out, source, history_length=HISTORY)

    assert manifest.dataset == "movielens-100k"
    assert manifest.source["kind"] == "path" and manifest.source["layout"] == "ml-100k"
    digests = {n: sha256_file(source / n) for n in ("u.data", "u.user", "u.item")}
    assert manifest.source["files"] == digests
    assert manifest.source["sha256"] == combined_sha256(digests)
    assert manifest.tables == {
        "user_id": 5,
        "gender": 3,
        "age_bucket": 8,
        "occupation": 5,
        "zip_prefix": 12,
        "item_id": 6,
        "genres": 6,  # <unknown> + Action, Adventure, Comedy, Drama, Sci-Fi
        "year_bucket": 24,
        "ctx_hour": 24,
        "ctx_weekday": 7,
        "text_tokens": 1 << 15,
        **{f"item_{k}_count_{w}": 24 for k in ("rating", "like") for w in ("1d", "7d", "30d")},
    }
    assert manifest.schema.labels == ("click", "like")
    assert manifest.schema.history_actions == ("like", "dislike")
    assert manifest.schema.has_history_timestamps
    assert {s: i.rows for s, i in manifest.splits.items()} == {
        "train": 10,
        "valid": 4,
        "test": 4,
        "users": 5,
        "items": 6,
    }  # users 1, 2, 4 and 5 have >= 3 events; user 3 is train only

    users = {r["user_id"]: r for r in read_split(out, "users").to_pylist()}
    assert users[0] == {
        "user_id": 0,
        "gender": 2,
        "age_bucket": 2,
        "occupation": 3,
        "zip_prefix": 9,
    }
    assert users[1]["age_bucket"] == 6 and users[1]["gender"] == 1  # 53, F
    assert users[2]["zip_prefix"] == 11 and users[2]["age_bucket"] == 1  # Canadian, 15
    assert users[3]["zip_prefix"] == 0  # empty zip
    assert users[4] == {
        "user_id": 4,
        "gender": 0,
        "age_bucket": 0,
        "occupation": 0,
        "zip_prefix": 0,
    }
    items = {r["item_id"]: r for r in read_split(out, "items").to_pylist()}
    assert items[1]["genres"] == [1, 2]
    static = ("item_id", "genres", "year_bucket")
    assert {k: items[3][k] for k in static} == {"item_id": 3, "genres": [0], "year_bucket": 0}
    assert {k: items[4][k] for k in static} == {"item_id": 4, "genres": [4, 5], "year_bucket": 3}
    assert items[5]["year_bucket"] == 1  # before 1920
    titles = pq.read_table(out / "raw_ids" / "items.parquet")["title"].to_pylist()
    assert titles[2] == "Café au lait (1994)"

    events = raw_events(out)
    assert all(r["position"] is None and r["label_click"] == 1.0 for r in events)
    ratings = {(u, i): r for u, i, r, _ in U_DATA}
    for row in events:
        assert row["label_like"] == float(ratings[row["raw_user"], row["raw_item"]] >= 4)
        assert row["genres"] == items[row["item_id"]]["genres"]  # denormalized
        assert row["gender"] == users[row["user_id"]]["gender"]
    # User 1: t=300 tie between items 6 and 3 -> item 3 first; 5 (t=400) is last.
    by_key = {(r["raw_user"], r["raw_item"]): r for r in events}
    assert by_key[1, 5]["split"] == "test" and by_key[1, 5]["raw_history"] == [6, 3, 2]
    assert by_key[1, 6]["split"] == "valid" and by_key[1, 6]["raw_history"] == [3, 2, 1]
    assert by_key[1, 6]["hist_like"] == [0, 0, 1]
    assert by_key[1, 6]["hist_dislike"] == [1, 0, 0]  # ratings 2, 3, 5
    assert by_key[1, 6]["hist_timestamps"] == [300, 200, 100]
    assert by_key[1, 1]["raw_history"] == []


def test_train_rows_are_in_timestamp_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_movielens("100k", out, write_ml100k(tmp_path / "src", U_DATA), HISTORY)
    timestamps = read_split(out, "train")["timestamp"].to_pylist()
    assert timestamps == sorted(timestamps)


def test_last_item_never_leaks_into_its_own_history(tmp_path: Path) -> None:
    """Each user's last item is unique to that user and tied in time with another event."""
    data = []
    for user in range(1, 6):
        unique_item = 1000 + user  # highest id: ordered last among the tie
        data += [(user, 1, 3, 10), (user, 2, 4, 20), (user, 3, 5, 30)]
        data += [(user, 4 + user % 2, 4, 40), (user, unique_item, 5, 40)]
    out = tmp_path / "out"
    prepare_movielens("100k", out, write_ml100k(tmp_path / "src", data, side_files=False), 10)
    events = raw_events(out)
    for row in events:
        assert row["raw_item"] not in row["raw_history"]
        if row["raw_item"] >= 1000:
            assert row["split"] == "test"
            assert row["raw_history"][0] == 4 + row["raw_user"] % 2
    for row in events:  # no other row of anyone sees a user's held-out unique item
        assert all(item < 1000 for item in row["raw_history"])


@st.composite
def random_ml100k_logs(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    pairs = draw(
        st.lists(
            st.tuples(st.integers(1, 6), st.integers(1, 12)), min_size=1, max_size=50, unique=True
        )
    )
    return [
        (u, i, draw(st.integers(1, 5)), draw(st.integers(0, 5)))  # few timestamps: many ties
        for u, i in pairs
    ]


@settings(max_examples=30, deadline=None)
@given(random_ml100k_logs(), st.integers(1, 5))
def test_prepared_rows_have_no_history_leakage(data, history_length: int) -> None:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_ml100k(root / "src", data, side_files=False)
        prepare_movielens("100k", root / "out", source, history_length)
        events = raw_events(root / "out")
    order_key = {(u, i): (t, i) for u, i, _, t in data}  # deterministic per-user order
    assert sorted((r["raw_user"], r["raw_item"]) for r in events) == sorted(order_key)
    for row in events:
        own = order_key[row["raw_user"], row["raw_item"]]
        keys = [order_key.get((row["raw_user"], item)) for item in row["raw_history"]]
        assert None not in keys  # every history item is one of this user's events
        assert all(key < own for key in keys)  # strictly earlier; never the event itself
        assert keys == sorted(keys, reverse=True)  # newest first
        earlier = sum(1 for (u, _), key in order_key.items() if u == row["raw_user"] and key < own)
        assert len(keys) == min(earlier, history_length)


def test_split_is_leave_last_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_movielens("100k", out, write_ml100k(tmp_path / "src", U_DATA), HISTORY)
    events = raw_events(out)
    assert len(events) == len(U_DATA)
    for user in {u for u, *_ in U_DATA}:
        rows = sorted(
            (r for r in events if r["raw_user"] == user),
            key=lambda r: (r["timestamp"], r["raw_item"]),
        )
        splits = [r["split"] for r in rows]
        if len(rows) < 3:
            assert set(splits) == {"train"}
        else:
            assert splits == ["train"] * (len(rows) - 2) + ["valid", "test"]
            # eval rows carry the whole history up to the held-out event
            assert len(rows[-1]["hist_item_ids"]) == min(len(rows) - 1, HISTORY)


def test_checksums_match_and_output_is_deterministic(tmp_path: Path) -> None:
    source = write_ml100k(tmp_path / "src", U_DATA)
    first = prepare_movielens("100k", tmp_path / "a", source, HISTORY)
    second = prepare_movielens("100k", tmp_path / "b", source, HISTORY)
    for split in first.splits:
        first.verify_checksums(tmp_path / "a", split)
    for name, side_file in first.extra["raw_ids"].items():
        assert sha256_file(tmp_path / "a" / side_file["path"]) == side_file["sha256"], name
    assert Manifest.load(tmp_path / "a").to_json() == first.to_json()
    assert first.to_json()["splits"] == second.to_json()["splits"]
    assert first.extra["raw_ids"] == second.extra["raw_ids"]
    # Preparing again over an existing output gives the same bytes too.
    again = prepare_movielens("100k", tmp_path / "a", source, HISTORY)
    assert again.to_json()["splits"] == first.to_json()["splits"]


def test_zip_source_matches_folder(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "ml-100k", U_DATA)
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, f"ml-100k/{path.name}")
    from_folder = prepare_movielens("100k", tmp_path / "a", folder, HISTORY)
    from_zip = prepare_movielens("100k", tmp_path / "b", archive, HISTORY)
    assert from_zip.source["sha256"] == from_folder.source["sha256"]
    assert from_zip.to_json()["splits"] == from_folder.to_json()["splits"]


def test_ml1m_dat_layout(tmp_path: Path) -> None:
    source = tmp_path / "ml-1m"
    source.mkdir()
    ratings = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in U_DATA)
    (source / "ratings.dat").write_text(ratings)
    (source / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072-1234\n")
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n3::Café (1994)::Drama\n"
    (source / "movies.dat").write_bytes(movies.encode("latin-1"))
    manifest = prepare_movielens("ml-1m", tmp_path / "out", source, HISTORY)
    assert manifest.dataset == "movielens-1m"
    assert manifest.tables["user_id"] == 5 and manifest.tables["item_id"] == 6
    users = read_split(tmp_path / "out", "users").to_pylist()
    assert users[0] == {
        "user_id": 0,
        "gender": 1,
        "age_bucket": 1,
        "occupation": 1,
        "zip_prefix": 5,
    }
    assert users[1]["age_bucket"] == 7 and users[1]["zip_prefix"] == 8
    items = read_split(tmp_path / "out", "items").to_pylist()
    assert items[0]["genres"] == [1, 2, 3] and items[0]["year_bucket"] == 17
    assert items[1]["genres"] == [0] and items[1]["year_bucket"] == 0  # not in movies.dat


def test_ml20m_csv_layout_has_only_user_id(tmp_path: Path) -> None:
    source = tmp_path / "ml-20m"
    source.mkdir()
    ratings = "userId,movieId,rating,timestamp\n"
    ratings += "".join(f"{u},{i},{r - 0.5},{t}\n" for u, i, r, t in U_DATA)
    (source / "ratings.csv").write_text(ratings)
    movies = 'movieId,title,genres\n1,"Toy Story, The (1995)",Adventure|Comedy\n'
    movies += "2,Nothing (2015),(no genres listed)\n"
    (source / "movies.csv").write_text(movies)
    manifest = prepare_movielens("20m", tmp_path / "out", source, HISTORY)
    user_features = [f.name for f in manifest.schema.user_features()]
    assert user_features == ["user_id", "hist_item_ids", "ctx_hour", "ctx_weekday"]
    assert read_split(tmp_path / "out", "users").column_names == ["user_id"]
    items = read_split(tmp_path / "out", "items").to_pylist()
    assert items[0]["genres"] == [1, 2] and items[1]["genres"] == [0]
    assert items[1]["year_bucket"] == 2 + (2015 - 1920) // 5
    likes = read_split(tmp_path / "out", "train")["label_like"].to_numpy()
    assert set(np.unique(likes)) <= {0.0, 1.0}


def test_wrong_layout_for_variant_is_an_error(tmp_path: Path) -> None:
    source = write_ml100k(tmp_path / "src", U_DATA)
    with pytest.raises(SourceError, match="not MovieLens 1m"):
        prepare_movielens("1m", tmp_path / "out", source)
    empty = tmp_path / "empty"
    (empty / "docs").mkdir(parents=True)
    (empty / "docs" / "README.txt").write_text("not a dataset")
    with pytest.raises(SourceError, match="no MovieLens ratings file"):
        prepare_movielens("100k", tmp_path / "out", empty)


def test_offline_recbole_copy_of_ml100k(tmp_path: Path) -> None:
    """The real offline path: no source, no download, the recbole wheel's atomic files."""
    try:
        wheel = recbole_wheel(default_cache_dir())
    except SourceError as error:  # no PyPI either: nothing to test against
        pytest.skip(f"recbole wheel unavailable: {error}")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(wheel, cache / RECBOLE_WHEEL)
    out = tmp_path / "ml-100k"
    manifest = prepare_movielens("100k", out, None, cache_dir=cache, allow_download=False)
    assert manifest.source["kind"] == "recbole"
    assert manifest.extra["counts"]["events"] == 100_000
    assert manifest.tables["user_id"] == 943 and manifest.tables["item_id"] == 1682
    assert {s: i.rows for s, i in manifest.splits.items()} == {
        "train": 100_000 - 2 * 943,
        "valid": 943,
        "test": 943,
        "users": 943,
        "items": 1682,
    }
    train = pq.ParquetFile(manifest.split_paths(out, "train")[0])
    assert train.metadata.num_row_groups >= 8  # several units for 2 ranks × 2 workers
    for split in ("valid", "test"):
        groups = sum(pq.ParquetFile(p).num_row_groups for p in manifest.split_paths(out, split))
        assert groups >= 8
    test = read_split(out, "test")
    lengths = np.array([len(h) for h in test["hist_item_ids"].to_pylist()])
    assert lengths.max() == 50 and lengths.min() >= 18  # ml-100k users have >= 20 ratings
    digest = hashlib.sha256((cache / RECBOLE_WHEEL).read_bytes()).hexdigest()
    assert digest == hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_download_is_cached_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_ml100k(tmp_path / "ml-100k", U_DATA)
    archive = tmp_path / "served.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, f"ml-100k/{path.name}")
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(archive.read_bytes())

    monkeypatch.setattr(movielens_source.urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "cache"
    first = prepare_movielens("100k", tmp_path / "a", None, HISTORY, cache_dir=cache)
    assert first.source["kind"] == "url" and first.source["url"] == requested[0]
    assert requested == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"]
    second = prepare_movielens("100k", tmp_path / "b", None, HISTORY, cache_dir=cache)
    assert second.source["kind"] == "cache" and len(requested) == 1
    assert second.source["sha256"] == first.source["sha256"]
    assert second.to_json()["splits"] == first.to_json()["splits"]
