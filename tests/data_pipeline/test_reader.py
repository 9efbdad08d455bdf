"""Reader: exactly-once coverage over ranks x workers, resumable state, schema and id errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipeline.loader import LoaderSpec, build_event_loader, worker_context
from data_pipeline.manifest import Manifest, SplitInfo
from data_pipeline.reader import ParquetEventStream, WorkUnit, assign_work_units, list_work_units
from data_pipeline.schema import SchemaError
from data_pipeline.validation import IdValidator
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import add_empty_file, write_tiny_dataset


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=30),
    world_size=st.integers(1, 4),
    workers=st.integers(1, 3),
    epoch=st.integers(0, 5),
    seed=st.integers(0, 100),
)
def test_assignment_is_a_partition(sizes, world_size, workers, epoch, seed) -> None:
    units = [WorkUnit("f", i, n) for i, n in enumerate(sizes)]
    seen: Counter[int] = Counter()
    for rank in range(world_size):
        for worker in range(workers):
            for unit in assign_work_units(
                units,
                epoch=epoch,
                seed=seed,
                rank=rank,
                world_size=world_size,
                worker_id=worker,
                num_workers=workers,
                shuffle=True,
            ):
                seen[unit.row_group] += 1
    assert seen == Counter(range(len(sizes)))


def _timestamps(table: pa.Table) -> list[int]:
    """Row key: train timestamps are unique in the tiny dataset."""
    return table.column("timestamp").to_pylist()


def _timestamp_loader(
    root: str,
    rank: int,
    world_size: int,
    workers: int,
    seed: int = 3,
    batch_size: int = 24,
    window: int = 2,
) -> StatefulDataLoader:
    """The real stream and loader, converting each batch to its row keys."""
    manifest = Manifest.load(root)
    units = list_work_units(manifest.split_paths(root, "train"))
    stream = ParquetEventStream(
        units,
        _timestamps,
        IdValidator(manifest.schema, manifest.tables),
        batch_size=batch_size,
        columns=None,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=True,
        window=window,
    )
    return StatefulDataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=worker_context() if workers else None,
    )


def _read_all_rows(rank: int, world_size: int, root: str) -> list[int]:
    return [key for batch in _timestamp_loader(root, rank, world_size, workers=2) for key in batch]


def test_two_ranks_two_workers_read_every_row_once(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    per_rank = run_distributed(_read_all_rows, 2, str(root))
    manifest = Manifest.load(root)
    table = pa.concat_tables(pq.read_table(p) for p in manifest.split_paths(root, "train"))
    got = Counter(per_rank[0] + per_rank[1])
    assert got == Counter(table["timestamp"].to_pylist())
    assert max(got.values()) == 1
    assert per_rank[0] and per_rank[1]


def test_epochs_reshuffle_and_seed_reproduces(tmp_path: Path) -> None:
    root = str(write_tiny_dataset(tmp_path / "data"))
    first = _timestamp_loader(root, 0, 1, workers=0)
    epoch0 = list(first)
    again = list(_timestamp_loader(root, 0, 1, workers=0))
    first.dataset.set_epoch(1)
    epoch1 = list(first)
    assert epoch0 == again
    assert epoch0 != epoch1
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(tmp_path: Path, workers: int) -> None:
    root = str(write_tiny_dataset(tmp_path / "data"))
    full = list(_timestamp_loader(root, 0, 1, workers, seed=5, batch_size=20, window=3))
    loader = _timestamp_loader(root, 0, 1, workers, seed=5, batch_size=20, window=3)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(7)]
    state = loader.state_dict()
    resumed = _timestamp_loader(root, 0, 1, workers, seed=5, batch_size=20, window=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full


def test_loader_builds_batches_for_every_row(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    spec = LoaderSpec(root=str(root), split="train", batch_size=50, shuffle=True)
    batches = list(build_event_loader(spec, Manifest.load(root), 0, 1))
    assert [b.size for b in batches] == [50] * 12 + [40]
    assert all(b.user_features.stride() == b.size for b in batches)


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path, row_group_size=64)


def _loader(root: Path, policy: str = "error"):
    spec = LoaderSpec(root=str(root), split="train", batch_size=64, id_policy=policy)
    return build_event_loader(spec, Manifest.load(root), 0, 1)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    path = Manifest.load(root).split_paths(root, "train")[1]
    _rewrite(path, pq.read_table(path).drop(["item_tags"]))
    with pytest.raises(SchemaError, match=rf"{path.name}.*missing column 'item_tags'"):
        _loader(root)


def test_wrong_dtype_names_column(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    path = Manifest.load(root).split_paths(root, "train")[0]
    table = pq.read_table(path)
    index = table.column_names.index("label_like")
    _rewrite(path, table.set_column(index, "label_like", pa.array(["x"] * table.num_rows)))
    with pytest.raises(SchemaError, match=r"column 'label_like' has type string, expected float"):
        _loader(root)


def _corrupt_ids(root: Path) -> Path:
    path = Manifest.load(root).split_paths(root, "train")[0]
    table = pq.read_table(path)
    items = table["item_id"].to_numpy().copy()
    items[100] = 10_000
    _rewrite(
        path, table.set_column(table.column_names.index("item_id"), "item_id", pa.array(items))
    )
    return path


def test_out_of_range_id_error_names_row_group(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    path = _corrupt_ids(root)
    with pytest.raises(SchemaError, match=rf"{path.name}: row group 1: column 'item_id'.*10000"):
        list(_loader(root))


def test_out_of_range_id_hash_policy_folds_into_range(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    _corrupt_ids(root)
    items = np.concatenate([b.item_ids.numpy() for b in _loader(root, "hash")])
    assert items.max() < Manifest.load(root).tables["item_id"] and items.min() >= 0


@pytest.mark.parametrize(
    "keep", [lambda n: 200, lambda n: n // 2, lambda n: n - 1], ids=["200B", "half", "n-1"]
)
def test_truncated_file_is_reported(tmp_path: Path, keep) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    path = Manifest.load(root).split_paths(root, "train")[0]
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])
    with pytest.raises(SchemaError, match=rf"{path.name}: not a readable Parquet file"):
        _loader(root)


def _row_group_bytes(path: Path, row_group: int, column: str) -> tuple[int, int]:
    """[start, stop) byte range of one column chunk (footer offsets)."""
    metadata = pq.ParquetFile(path).metadata.row_group(row_group)
    names = [metadata.column(i).path_in_schema for i in range(metadata.num_columns)]
    chunk = metadata.column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return start, start + chunk.total_compressed_size


@pytest.mark.parametrize("damage", ["overwrite_chunk", "flip_last_byte"])
def test_corrupt_row_group_names_file_and_row_group(tmp_path: Path, damage: str) -> None:
    """The footer is intact, so listing succeeds; reading the damaged row group must fail. A
    single flipped byte inside compressed page data can decode to wrong values silently; the
    writer's page CRCs, verified on read, catch it."""
    root = write_tiny_dataset(tmp_path / "data")
    path = Manifest.load(root).split_paths(root, "train")[1]
    start, stop = _row_group_bytes(path, 2, "label_like")
    data = bytearray(path.read_bytes())
    if damage == "overwrite_chunk":
        data[start:stop] = b"\xff" * (stop - start)
    else:
        data[stop - 1] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(SchemaError, match=rf"{path.name}: row group 2 could not be read"):
        list(_loader(root))


@pytest.mark.parametrize("row_groups", [0, 1])
def test_empty_file_in_split_is_skipped(tmp_path: Path, row_groups: int) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    add_empty_file(root, "train", row_groups)
    manifest = Manifest.load(root)
    manifest.verify_checksums(root, "train")
    assert sum(b.size for b in _loader(root)) == 640


def test_empty_split_error_names_manifest_and_split(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    manifest.splits["valid"] = SplitInfo()
    manifest.save(root)
    add_empty_file(root, "valid")
    spec = LoaderSpec(root=str(root), split="valid", batch_size=64)
    with pytest.raises(SchemaError, match=r"manifest.json: split 'valid' has no rows \(1 files"):
        build_event_loader(spec, Manifest.load(root), 0, 1)


def test_checksum_mismatch_is_reported(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    path = manifest.split_paths(root, "train")[0]
    _rewrite(path, pq.read_table(path))
    with pytest.raises(SchemaError, match=rf"{path.name}: sha256 .* does not match"):
        manifest.verify_checksums(root, "train")
