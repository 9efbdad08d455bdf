"""A batch crosses from a loader worker as one packed buffer: ``tensor_pack`` round trips, and
``Batch`` pickles through the DataLoader's own pickler to the same batch, viewing one storage."""

from __future__ import annotations

import io
import pickle
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reducers)
from torchrec import KeyedJaggedTensor

from data_pipeline.batch import Batch
from data_pipeline.loader import LoaderSpec, build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.tensor_pack import ALIGNMENT, pack, unpack
from tests.tiny_dataset import write_tiny_dataset


def test_pack_round_trips_dtypes_shapes_and_strided_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randint(-5, 5, (7,), generator=generator),
        torch.rand(3, 5, generator=generator).T,  # not contiguous
        torch.zeros(4, 0, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randint(0, 9, (5,), dtype=torch.int32, generator=generator),
        torch.rand(2, 3, dtype=torch.float64, generator=generator),
    ]
    buffer, specs = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert all(spec.offset % ALIGNMENT == 0 for spec in specs)
    back = unpack(buffer, specs)
    for got, want in zip(back, tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def _batches(root: Path) -> list[Batch]:
    manifest = Manifest.load(root)
    spec = LoaderSpec(root=str(root), split="train", batch_size=48, recent_history=2)
    return list(build_event_loader(spec, manifest, 0, 1))


def _assert_same(got: Batch, want: Batch) -> None:
    for side in ("user_features", "item_features"):
        a, b = getattr(got, side), getattr(want, side)
        assert a.keys() == b.keys() and a.stride() == b.stride()
        assert torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())
        assert (a.weights_or_none() is None) == (b.weights_or_none() is None)
        if b.weights_or_none() is not None:
            assert torch.equal(a.weights(), b.weights())
        assert a.length_per_key() == b.length_per_key()
    for name in ("labels", "position", "user_ids", "item_ids", "impression_negatives"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.ranker_score.isnan(), want.ranker_score.isnan())
    assert torch.equal(got.weight, want.weight) and torch.equal(got.timestamp, want.timestamp)


def test_batch_pickles_as_one_buffer_to_the_same_batch(tmp_path: Path) -> None:
    batches = _batches(write_tiny_dataset(tmp_path / "data", impressions=True))
    assert len(batches) > 3
    first = batches[0]
    keys, lengths = first.user_features.keys(), first.user_features.lengths()
    weighted = KeyedJaggedTensor(
        keys=keys,
        values=first.user_features.values(),
        lengths=lengths,
        weights=torch.rand(first.user_features.values().shape[0]),
    )
    for batch in [*batches, replace(first, user_features=weighted)]:
        stream = io.BytesIO()
        ForkingPickler(stream, pickle.HIGHEST_PROTOCOL).dump(batch)  # the loader's pickler
        got = pickle.loads(stream.getvalue())
        _assert_same(got, batch)
        storages = {
            t.untyped_storage().data_ptr()
            for t in (
                got.user_features.values(),
                got.item_features.lengths(),
                got.labels,
                got.item_ids,
                got.timestamp,
            )
        }
        assert len(storages) == 1  # one transfer


def test_worker_batches_equal_in_process_batches(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", impressions=True)
    manifest = Manifest.load(root)
    spec = LoaderSpec(root=str(root), split="train", batch_size=48, recent_history=2)
    in_process = list(build_event_loader(spec, manifest, 0, 1))
    from_worker = list(build_event_loader(replace(spec, num_workers=1), manifest, 0, 1))
    assert len(from_worker) == len(in_process)
    for got, want in zip(from_worker, in_process, strict=True):
        _assert_same(got, want)
