"""Builds the resumable data loader of one rank over one split of a prepared dataset."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipeline.batch import Batch, BatchBuilder
from data_pipeline.derived import with_derived_features
from data_pipeline.feature_encoding import FeatureEncoding
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import MANIFEST_NAME, Manifest
from data_pipeline.reader import ParquetEventStream, WorkUnit, list_work_units, seed_worker
from data_pipeline.schema import IMPRESSION_NEGATIVES, USER_ID, EventSchema, SchemaError
from data_pipeline.sequence_windows import LastEvents, WindowBatchBuilder
from data_pipeline.validation import IdValidator


@dataclass(frozen=True)
class LoaderSpec:
    """Args:
    root: dataset directory (holds manifest.json).
    split: ``train`` / ``valid`` / ``test``.
    batch_size: rows per batch.
    num_workers: loader worker processes per rank (0 = read in the training process).
    shuffle: permute row groups and rows per epoch.
    window: row groups per shuffle window.
    id_policy: ``error`` or ``hash``.
    seed: shuffling seed.
    recent_history: newest history items pooled as their own feature (0: off).
    impression_negatives: K impression hard negatives per row in ``Batch.impression_negatives``
        (0: off; K > 0 needs a dataset whose manifest has ``has_impression_negatives``).
    recency_buckets: -1: no per-event history features; >= 0: the history encoder's action
        features, and ``hist_recency`` with that many buckets when > 0.
    schema: the stored features to read (``trainer.features``); None: the manifest's.
    encoding: counter statistics and weight normalization of the batches.
    id_policies: per-column id policy overriding ``id_policy``.
    tables: table name -> rows that ids are checked against (the manifest's plus features'
        own tables, ``trainer.features``); None: the manifest's.
    worker_setup: a module-level function each loader worker runs first (the trainer's
        process set-up: log filters); None: nothing.
    sequence_length: sequence mode (:mod:`data_pipeline.sequence_windows`): batches of
        ``batch_size`` windows of each user's last event and its history, with up to this many
        targets each; 0: one logged event per row.
    """

    root: str
    split: str
    batch_size: int
    num_workers: int = 0
    shuffle: bool = False
    window: int = 4
    id_policy: str = "error"
    seed: int = 0
    recent_history: int = 0
    impression_negatives: int = 0
    recency_buckets: int = -1
    schema: EventSchema | None = None
    encoding: FeatureEncoding | None = None
    id_policies: Mapping[str, str] = field(default_factory=dict)
    tables: Mapping[str, int] | None = None
    worker_setup: Callable[[], None] | None = None
    sequence_length: int = 0


def build_event_loader(
    spec: LoaderSpec, manifest: Manifest, rank: int, world_size: int
) -> StatefulDataLoader:
    """A StatefulDataLoader yielding ``Batch`` objects for this rank (``state_dict`` resumable).

    Empty files of the split are skipped; a rank whose share is empty yields no batch (callers
    pad through ``trainer.runtime.synchronized``).

    Raises:
        SchemaError: the split has no rows at all (names the manifest and split), or a file of it
            is unreadable or off-schema (names the file).
    """
    root = Path(spec.root)
    schema = spec.schema or manifest.schema
    encoding = spec.encoding or FeatureEncoding.from_manifest(
        manifest.counters, manifest.tables, schema.features
    )
    if spec.impression_negatives > 0 and not schema.has_impression_negatives:
        raise SchemaError(
            f"{root / MANIFEST_NAME}: impression_negatives={spec.impression_negatives} needs "
            f"column '{IMPRESSION_NEGATIVES}', but dataset '{manifest.dataset}' has no logged "
            "impressions (schema.has_impression_negatives is false)"
        )
    units = _split_units(root, manifest, schema, spec.split)
    derived = with_derived_features(schema, spec.recent_history, spec.recency_buckets)
    per_row = BatchBuilder(
        derived,
        spec.recent_history,
        impression_negatives=spec.impression_negatives,
        recency_buckets=spec.recency_buckets,
        encoding=encoding,
    )
    convert: Callable[[pa.Table], Batch] = per_row
    row_filter = None
    if spec.sequence_length > 0:
        store = ItemFeatureStore.load(root, manifest, derived, encoding)
        convert = WindowBatchBuilder(per_row, store, spec.sequence_length)
        row_filter = LastEvents.scan(units, manifest.tables[USER_ID])
    stream = ParquetEventStream(
        units=units,
        convert=convert,
        validator=IdValidator(
            schema, dict(spec.tables or manifest.tables), spec.id_policy, spec.id_policies
        ),
        batch_size=spec.batch_size,
        columns=schema.event_arrow_schema().names,
        rank=rank,
        world_size=world_size,
        seed=spec.seed,
        shuffle=spec.shuffle,
        window=spec.window,
        row_filter=row_filter,
    )
    return StatefulDataLoader(
        stream,
        batch_size=None,
        num_workers=spec.num_workers,
        worker_init_fn=partial(_init_worker, spec.worker_setup) if spec.num_workers else None,
        persistent_workers=False,
        multiprocessing_context=worker_context() if spec.num_workers else None,
        prefetch_factor=4 if spec.num_workers else None,
    )


# What the forkserver imports once, before it forks any worker: the reader and its libraries.
WORKER_PRELOAD = ["__main__", "data_pipeline.loader"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of loader workers: a forkserver that has imported the reader.

    Workers start from a clean server process, since forking a trainer that already runs gloo,
    OpenMP and Arrow thread pools can deadlock the child. The server imports torch, pyarrow and
    the reader once (nothing in them starts a thread on import), so each worker is a fork of
    it: about a second per loader saved over a server that imports nothing, paid by every
    validation's two loaders and every epoch's training loader.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def _split_units(root: Path, manifest: Manifest, schema: EventSchema, split: str) -> list[WorkUnit]:
    """The non-empty row groups of ``split``'s files.

    Raises:
        SchemaError: the split has no rows at all, or a file of it is unreadable or off-schema.
    """
    paths = manifest.split_paths(root, split)
    units = list_work_units(paths, schema.event_arrow_schema())
    if not units:
        # Empty files are fine (they yield no units); an empty split would train or evaluate on
        # nothing and report success.
        raise SchemaError(
            f"{root / MANIFEST_NAME}: split '{split}' has no rows ({len(paths)} files, "
            "none with a non-empty row group); prepare the dataset again or choose another split"
        )
    return units


def _init_worker(setup: Callable[[], None] | None, worker_id: int) -> None:
    if setup is not None:
        setup()
    seed_worker(worker_id)
