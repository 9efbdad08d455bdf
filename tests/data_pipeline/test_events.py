"""``twotower prepare events``: a user's own log (string ids, several formats) becomes the same
event shards as the built-in converters, in bounded memory, checked against brute force."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from data_pipeline.datasets.events import EventsOptions, Stage, prepare_events
from data_pipeline.datasets.events_mapping import (
    DedupPolicy,
    EventMapping,
    SideTableMapping,
    load_mapping,
)
from data_pipeline.datasets.events_spill import TimeCounts, k_core
from data_pipeline.datasets.split import SplitConfig, SplitProtocol, temporal_thresholds
from data_pipeline.manifest import Manifest
from data_pipeline.schema import SchemaError
from launch.cli import main as cli_main

EVENTS = 3000


def _log(seed: int = 0, events: int = EVENTS) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "customer": [f"c-{u}" for u in rng.integers(0, 120, events)],
            "sku": [f"sku{i}" for i in rng.zipf(1.4, events) % 300],
            "ts": 1_700_000_000 + rng.integers(0, 86_400 * 20, events),
            "click": rng.integers(0, 2, events).astype(np.float64),
            "purchase": (rng.random(events) < 0.2).astype(np.int64),
        }
    )


def _write_log(folder: Path, table: pa.Table) -> Path:
    """Half Parquet, half CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), folder / "a.parquet", row_group_size=500)
    pa_csv.write_csv(table.slice(half), folder / "b.csv")
    return folder


def _catalog(path: Path) -> SideTableMapping:
    table = pa.table(
        {
            "sku": [f"sku{i}" for i in range(300)],
            "brand": [f"b{i % 7}" for i in range(300)],
            "tags": ["|".join(f"t{j}" for j in range(i % 3)) for i in range(300)],
            "title": [f"blue shoe {i % 11}" for i in range(300)],
        }
    )
    pq.write_table(table, path)
    return SideTableMapping(path, "sku", ("brand",), ("tags",), ("title",))


MAPPING = EventMapping(user="customer", item="sku", timestamp="ts", labels=("click", "purchase"))


def _rows(out: Path, split: str) -> pa.Table:
    return pq.read_table(out / split)


def _raw(out: Path, side: str) -> list[str]:
    return (
        pq.read_table(out / "raw_ids" / f"{side}.parquet").column(f"raw_{side[:-1]}_id").to_pylist()
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("events")
    log = _log()
    source = _write_log(tmp / "log", log)
    mapping = EventMapping(**{**MAPPING.__dict__, "items": _catalog(tmp / "catalog.parquet")})
    out = tmp / "out"
    manifest = prepare_events(source, out, mapping, EventsOptions(partition_events=700))
    return {"log": log, "out": out, "manifest": manifest, "source": source, "mapping": mapping}


def test_rows_are_the_log_with_point_in_time_history(prepared: dict) -> None:
    out, log, manifest = prepared["out"], prepared["log"], prepared["manifest"]
    assert manifest.extra["spill_partitions"] == 5  # 3,000 events / 700 per partition
    users, items = _raw(out, "users"), _raw(out, "items")
    assert users == sorted(set(log.column("customer").to_pylist()))
    rows = pa.concat_tables([_rows(out, s) for s in ("train", "valid", "test")])
    assert rows.num_rows == EVENTS
    got = Counter(
        (users[u], items[i], t, c, p)
        for u, i, t, c, p in zip(
            *(rows.column(n).to_pylist() for n in ("user_id", "item_id", "timestamp")),
            rows.column("label_click").to_pylist(),
            rows.column("label_purchase").to_pylist(),
        )
    )
    want = Counter(
        zip(*(log.column(n).to_pylist() for n in ("customer", "sku", "ts", "click", "purchase")))
    )
    assert got == want
    # Brute force: a user's history is every earlier event (timestamp, item, log position),
    # newest first, at most H = 50.
    timeline: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for position, (user, item, ts) in enumerate(
        zip(*(log.column(n).to_pylist() for n in ("customer", "sku", "ts")))
    ):
        timeline[user].append((ts, items.index(item), position))
    for events in timeline.values():
        events.sort()
    test = _rows(out, "test")
    for user, item, history in zip(
        *(test.column(n).to_pylist() for n in ("user_id", "item_id", "hist_item_ids"))
    ):
        events = timeline[users[user]]
        assert events[-1][1] == item  # leave-last-out: the user's last event is the test row
        assert history == [e[1] for e in events[:-1]][::-1][:50]


def test_splits_features_and_manifest(prepared: dict) -> None:
    out, manifest = prepared["out"], prepared["manifest"]
    counts = manifest.extra["counts"]
    held_out = sum(
        1 for n in Counter(prepared["log"].column("customer").to_pylist()).values() if n >= 3
    )
    assert counts["test_rows"] == counts["valid_rows"] == held_out
    assert manifest.tables["item_brand"] == 8 and manifest.tables["item_tags"] == 3
    items = pq.read_table(out / "items").to_pydict()
    raw_items = _raw(out, "items")
    for dense, brand, tags in zip(items["item_id"], items["item_brand"], items["item_tags"]):
        number = int(raw_items[dense].removeprefix("sku"))
        vocabulary = manifest.extra["vocabularies"]
        assert vocabulary["item_brand"][brand] == f"b{number % 7}"
        assert [vocabulary["item_tags"][t] for t in tags] == (
            [f"t{j}" for j in range(number % 3)] or ["<unknown>"]
        )
    assert set(pq.read_schema(out / "train" / "part-00000.parquet").names) >= {
        "item_title",
        "item_title_weights",
        "ctx_hour",
        "hist_purchase",
        "hist_timestamps",
    }
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no staging left
    assert Manifest.load(out).splits["train"].rows == counts["train_rows"]


def test_partitions_do_not_change_the_dataset(prepared: dict, tmp_path: Path) -> None:
    options = EventsOptions(partition_events=10**9)
    prepare_events(prepared["source"], tmp_path / "one", prepared["mapping"], options)
    for split in ("train", "test", "items", "users"):
        many = _rows(prepared["out"], split)
        one = _rows(tmp_path / "one", split)
        names = ("user_id", "item_id", "timestamp", "label_click", "label_purchase")
        keys = [(name, "ascending") for name in names if name in one.column_names]
        assert many.sort_by(keys).equals(one.sort_by(keys)), split
    again = tmp_path / "again"
    prepare_events(prepared["source"], again, prepared["mapping"], options)
    for path in sorted((tmp_path / "one").rglob("*.parquet")):
        assert path.read_bytes() == (again / path.relative_to(tmp_path / "one")).read_bytes()


def _brute_k_core(pairs: list[tuple[int, int]], min_user: int, min_item: int) -> set:
    alive = set(pairs)
    while True:
        users = Counter(u for u, i in pairs if (u, i) in alive)
        items = Counter(i for u, i in pairs if (u, i) in alive)
        kept = {(u, i) for u, i in alive if users[u] >= min_user and items[i] >= min_item}
        if kept == alive:
            return alive
        alive = kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_core_is_the_fixed_point(seed: int) -> None:
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, 30, 200), rng.zipf(1.5, 200) % 40
    parts = [{"user": user[:120], "item": item[:120]}, {"user": user[120:], "item": item[120:]}]
    core = k_core(lambda: iter(parts), 30, 40, 5, 3)
    got = {(u, i) for u, i in zip(user, item) if core.user_alive[u] and core.item_alive[i]}
    assert got == _brute_k_core(list(zip(user.tolist(), item.tolist())), 5, 3)
    assert core.iterations >= 2


@pytest.mark.parametrize("policy", list(DedupPolicy))
def test_dedup_against_brute_force(policy: DedupPolicy, tmp_path: Path) -> None:
    log = _log(3, 400)
    path = tmp_path / "log.parquet"
    pq.write_table(log, path)
    mapping = EventMapping(**{**MAPPING.__dict__, "dedup": policy})
    prepare_events(path, tmp_path / "out", mapping, EventsOptions(partition_events=150))
    rows = pa.concat_tables([_rows(tmp_path / "out", s) for s in ("train", "valid", "test")])
    users, items = _raw(tmp_path / "out", "users"), _raw(tmp_path / "out", "items")
    got = Counter(
        (users[u], items[i], t)
        for u, i, t in zip(
            *(rows.column(n).to_pylist() for n in ("user_id", "item_id", "timestamp"))
        )
    )
    events = sorted(
        (u, i, t, position)
        for position, (u, i, t) in enumerate(
            zip(*(log.column(n).to_pylist() for n in ("customer", "sku", "ts")))
        )
    )
    chosen: dict = {}
    for u, i, t, position in events:
        if policy is DedupPolicy.KEEP_ALL:
            chosen[(u, i, t, position)] = (u, i, t)
        elif policy is DedupPolicy.FIRST:
            chosen.setdefault((u, i), (u, i, t))
        else:
            chosen[(u, i)] = (u, i, t)
    assert got == Counter(chosen.values())


@pytest.mark.parametrize("seed", range(5))
def test_time_counts_give_the_exact_temporal_thresholds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    timestamps = rng.integers(0, 50, int(rng.integers(20, 400)))
    counts = TimeCounts()
    for part in np.array_split(timestamps, 4):
        counts.add(part)
    for q1, q2 in ((0.5, 0.8), (0.8, 0.9), (0.3, 0.35)):
        try:
            want = temporal_thresholds(timestamps, q1, q2)
        except ValueError as error:
            with pytest.raises(ValueError, match=str(error)[:20]):
                counts.thresholds(q1, q2)
            continue
        assert counts.thresholds(q1, q2) == want


def test_temporal_split_with_strictly_earlier_history(tmp_path: Path) -> None:
    log = _log(4, 1500)
    path = tmp_path / "log.parquet"
    pq.write_table(log, path)
    options = EventsOptions(split=SplitConfig(SplitProtocol.TEMPORAL, 0.7, 0.85))
    manifest = prepare_events(path, tmp_path / "out", MAPPING, options)
    t1 = manifest.extra["split"]["valid_start_timestamp"]
    t2 = manifest.extra["split"]["test_start_timestamp"]
    assert t1 == temporal_thresholds(log.column("ts").to_numpy(), 0.7, 0.85).valid_start
    for split, low, high in (("train", None, t1), ("valid", t1, t2), ("test", t2, None)):
        rows = _rows(tmp_path / "out", split)
        times = rows.column("timestamp").to_numpy()
        assert (low is None or (times >= low).all()) and (high is None or (times < high).all())
        for t, history in zip(times, rows.column("hist_timestamps").to_pylist()):
            assert all(h < t for h in history)


def test_sequence_format_and_other_text_formats(tmp_path: Path) -> None:
    lines = ["u1 a b c d", "u2 b c", "u3 d a b a"]
    (tmp_path / "seq.txt").write_text("\n".join(lines) + "\n")
    prepare_events(tmp_path / "seq.txt", tmp_path / "seq", EventMapping(), EventsOptions())
    items = _raw(tmp_path / "seq", "items")
    test = _rows(tmp_path / "seq", "test").to_pydict()
    assert [items[i] for i in test["item_id"]] == ["d", "a"]  # u2 has 2 events: train only
    assert [[items[i] for i in h] for h in test["hist_item_ids"]] == [
        ["c", "b", "a"],
        ["b", "a", "d"],
    ]
    log = _log(5, 200)
    jsonl = "\n".join(json.dumps(r) for r in log.to_pylist())
    (tmp_path / "log.jsonl").write_text(jsonl + "\n")
    pa_csv.write_csv(log, tmp_path / "log.tsv", pa_csv.WriteOptions(delimiter="\t"))
    reference = prepare_events(_parquet(tmp_path, log), tmp_path / "p", MAPPING, EventsOptions())
    for name in ("log.jsonl", "log.tsv"):
        manifest = prepare_events(tmp_path / name, tmp_path / name[4:], MAPPING, EventsOptions())
        assert manifest.extra["counts"] == reference.extra["counts"]
        assert _rows(tmp_path / name[4:], "test").equals(_rows(tmp_path / "p", "test"))


def _parquet(tmp_path: Path, log: pa.Table) -> Path:
    path = tmp_path / "log.parquet"
    pq.write_table(log, path)
    return path


def _bad_csv(tmp_path: Path, row: str) -> Path:
    log = tmp_path / "bad"
    log.mkdir(exist_ok=True)
    text = "customer,sku,ts,click,purchase\nc1,s1,10,1,0\nc1,s2,20,0,1\n" + row + "\n"
    (log / "b.csv").write_text(text)
    return log / "b.csv"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (",s3,30,1,0", r"b.csv, row 2: column 'customer': missing"),
        ("c2,s3,30,yes,0", r"b.csv, row 2: column 'click': label 'yes' is not a number"),
        ("c2,s3,noon,1,0", r"b.csv, row 2: column 'ts': 'noon' is neither"),
        ("c2,s3,30,1", r"b.csv: unparseable row"),
    ],
)
def test_bad_input_is_named_and_keeps_the_previous_dataset(
    row: str, message: str, tmp_path: Path, prepared: dict
) -> None:
    out = tmp_path / "out"
    prepare_events(_parquet(tmp_path, _log(6, 100)), out, MAPPING, EventsOptions())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SchemaError, match=message):
        prepare_events(_bad_csv(tmp_path, row), out, MAPPING, EventsOptions())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "log.parquet", "out"]


def test_bad_mappings_are_named(tmp_path: Path) -> None:
    path = _parquet(tmp_path, _log(7, 50))
    with pytest.raises(SchemaError, match=r"log.parquet: missing column\(s\) \['buyer'\]"):
        prepare_events(
            path, tmp_path / "o", EventMapping(user="buyer", item="sku"), EventsOptions()
        )
    temporal = EventsOptions(split=SplitConfig(SplitProtocol.TEMPORAL))
    with pytest.raises(ValueError, match="--split temporal needs event times"):
        prepare_events(path, tmp_path / "o", EventMapping(user="customer", item="sku"), temporal)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("user: customer\nitem: sku\nlabel: [click]\n")
    with pytest.raises(ValueError, match=r"mapping.yaml: unknown key\(s\) \['label'\]"):
        load_mapping(mapping)
    mapping.write_text("user: customer\nitem: sku\nlabels: [Click Rate]\n")
    with pytest.raises(ValueError, match="'Click Rate' is not a usable label name"):
        load_mapping(mapping)
    with pytest.raises(SchemaError, match="no events left after the k-core"):
        prepare_events(
            path,
            tmp_path / "o",
            EventMapping(**{**MAPPING.__dict__, "min_user_events": 10**6}),
            EventsOptions(),
        )


def test_cli_with_a_mapping_file(tmp_path: Path) -> None:
    path = _parquet(tmp_path, _log(8, 300))
    _catalog(tmp_path / "catalog.parquet")
    (tmp_path / "mapping.yaml").write_text(
        "user: customer\nitem: sku\ntimestamp: ts\nlabels: [click, purchase]\n"
        "items: {path: catalog.parquet, key: sku, categorical: [brand]}\n"
    )
    argv = ["prepare", "events", "--input", str(path), "--mapping", str(tmp_path / "mapping.yaml")]
    assert cli_main([*argv, "--min-user-events", "2", "--out", str(tmp_path / "out")]) == 0
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.extra["k_core"]["min_user_events"] == 2
    assert "item_brand" in manifest.tables
    assert (
        cli_main(["prepare", "events", "--input", str(tmp_path / "none*.csv"), "--out", "x"]) == 2
    )


def test_counters_against_brute_force(prepared: dict) -> None:
    """Every row's item counters count the same item's events of the window strictly before
    it; the items/ snapshot counts train events only, at max(train timestamp) + 1."""
    out, manifest = prepared["out"], prepared["manifest"]
    assert manifest.extra["counters"]["kinds"]["purchase"] == "purchase > 0"
    assert set(manifest.counters) >= {"item_event_count_1d", "item_purchase_count_30d"}
    splits = {s: _rows(out, s).to_pydict() for s in ("train", "valid", "test")}
    every = [
        (i, t, p, s)
        for s, rows in splits.items()
        for i, t, p in zip(rows["item_id"], rows["timestamp"], rows["label_purchase"])
    ]
    windows = {"1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}
    for split, rows in splits.items():
        for index in range(0, len(rows["item_id"]), 7):
            item, time = rows["item_id"][index], rows["timestamp"][index]
            for window, seconds in windows.items():
                events = [e for e in every if e[0] == item and time - seconds <= e[1] < time]
                assert rows[f"item_event_count_{window}"][index] == len(events), split
                purchases = sum(1 for e in events if e[2] > 0)
                assert rows[f"item_purchase_count_{window}"][index] == purchases
    train = [e for e in every if e[3] == "train"]
    at = max(e[1] for e in train) + 1
    assert manifest.extra["counters"]["snapshot_time"] == at
    items = _rows(out, "items").to_pydict()
    for item, count in zip(items["item_id"], items["item_event_count_7d"]):
        assert count == sum(1 for e in train if e[0] == item and at - windows["7d"] <= e[1] < at)


def test_staged_jobs_equal_one_process(prepared: dict, tmp_path: Path) -> None:
    """global, the partitions in any order (as a job array runs them), merge: the same files,
    byte for byte, as the one-process run; a stage with other flags, an unknown partition and a
    merge before every partition finished are refused, naming why."""
    source, mapping = prepared["source"], prepared["mapping"]
    options = EventsOptions(partitions=3)
    prepare_events(source, tmp_path / "one", mapping, options)
    out = tmp_path / "staged"
    assert cli_main(_cli(source, out, "--stage", "global", "--partitions", "3")) == 0
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match=r"partition\(s\) \[0, 1, 2\] have not finished"):
        prepare_events(source, out, mapping, options, Stage.MERGE)
    with pytest.raises(ValueError, match=r"other \['history_length'\]"):
        prepare_events(source, out, mapping, EventsOptions(history_length=7), Stage.PARTITION, 0)
    with pytest.raises(ValueError, match=r"--partition must be one of 0 \.\. 2, got 3"):
        prepare_events(source, out, mapping, options, Stage.PARTITION, 3)
    for p in (2, 0, 1):
        assert cli_main(_cli(source, out, "--stage", "partition", "--partition", str(p))) == 0
    assert cli_main(_cli(source, out, "--stage", "merge")) == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file()
    )
    for path in files:
        if path.name != "manifest.json":
            assert (out / path).read_bytes() == (tmp_path / "one" / path).read_bytes(), path
    assert Manifest.load(out).splits == Manifest.load(tmp_path / "one").splits
    assert not (tmp_path / ".staged.staging").exists()


def _cli(source: Path, out: Path, *stage: str) -> list[str]:
    """The CLI flags of the fixture's mapping (the catalog from ``_catalog``)."""
    return [
        "prepare", "events", "--input", str(source), "--mapping", str(_mapping_file(source)),
        "--out", str(out), *stage,
    ]  # fmt: skip


def _mapping_file(source: Path) -> Path:
    path = source.parent / "mapping.yaml"
    path.write_text(
        "user: customer\nitem: sku\ntimestamp: ts\nlabels: [click, purchase]\n"
        "items: {path: catalog.parquet, key: sku, categorical: [brand], lists: [tags], "
        "text: [title]}\n"
    )
    return path
