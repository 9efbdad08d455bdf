"""Checkpoints with torch.distributed.checkpoint (DCP): sharded tables stay sharded on disk.

A checkpoint lives in ``<run>/checkpoints/step-N`` and is visible only once ``.complete`` exists,
written by rank 0 after every rank finished writing (an interrupted save is ignored and replaced).
It holds everything a run needs to continue as if it had never stopped:

- ``model``: sharded tables (ShardedTensor) and dense parameters;
- ``sparse_optimizer``: the fused table optimizer's state (sharded like its tables);
- ``dense_optimizer``: the data-parallel optimizer's state (replicated);
- ``samplers``: replicated sampler state (the logQ frequency estimator);
- ``rank<r>``: per-rank state: RNG states and the cross-batch memory;
- ``meta.json``: step, epoch, rows trained, skipped steps, world size, every rank's positions
  (data loader as of the last trained step, the open logging window) and the resolved config.

The parts come from the job and the loop as named ``Stateful`` objects
(``trainer.runtime.state.CheckpointState``).

DCP reshards tables and replicated state to any world size; per-rank state (RNG, loader
position, memory) applies only at the world size it was saved with. Loading reads tensors only
(DCP plus ``weights_only``), never arbitrary pickles.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from config import CheckpointConfig
from trainer.runtime.run_files import CHECKPOINTS_DIR
from trainer.runtime.state import CheckpointState

logger = logging.getLogger(__name__)

COMPLETE = ".complete"
META = "meta.json"
# What a full resume expects: 2 = named Stateful parts, per-rank positions in meta.json.
LAYOUT = 2


class CheckpointLayoutError(RuntimeError):
    """A checkpoint to resume from was written with another layout of its parts."""


@dataclass
class Progress:
    """Where training stands (the same on every rank).

    Args:
        step: optimizer steps taken (skipped non-finite steps included).
        epoch: current epoch.
        rows: live rows trained so far over all ranks.
        skipped_steps: steps skipped for a non-finite loss.
        row_digest: order-free digest of the rows trained so far (see ``trainer.train``).
    """

    step: int = 0
    epoch: int = 0
    rows: int = 0
    skipped_steps: int = 0
    row_digest: int = 0


@dataclass
class Restored:
    """What :meth:`Checkpointer.restore` found.

    Args:
        path: the checkpoint folder.
        progress: step, epoch and rows at save time.
        same_world_size: saved at this world size (per-rank parts were restored too).
        meta: the checkpoint's meta.json.
    """

    path: Path
    progress: Progress
    same_world_size: bool
    meta: dict[str, Any] = field(default_factory=dict)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks for something other than tensors and DCP's own metadata."""


# DCP's .metadata is a pickle: only its own dataclasses, torch sizes, dtypes and paths may load.
_METADATA_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
}
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module in _METADATA_MODULES
            or (module, name) in _METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self.source}: refers to {module}.{name}, which is neither a tensor nor "
                "checkpoint metadata; refusing to load it"
            )
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read by a restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = _MetadataUnpickler(path.read_bytes(), path).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not checkpoint metadata")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """Loads tensors only: byte entries (pickled objects) are refused."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(
            f"checkpoint entry '{read_item.dest_index.fqn}' is a pickled object, not a tensor; "
            "refusing to load it"
        )


def _load(state: dict[str, Any], path: Path) -> None:
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())


def checkpoints_root(run_dir: Path | str) -> Path:
    """The folder holding a run's ``step-N`` checkpoints."""
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step-{step}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.exists():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def resolve_checkpoint(path: Path | str) -> Path:
    """A complete checkpoint folder, or a run directory's latest complete checkpoint.

    Raises:
        FileNotFoundError: neither (names the path).
    """
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"{path}: neither a complete checkpoint (no {COMPLETE}) nor a run directory with one"
        )
    return latest


BEST = "best"


def best_checkpoint(run_dir: Path | str) -> Path | None:
    """The run's best-validation checkpoint (``checkpoints/best``), if one is complete."""
    path = checkpoints_root(run_dir) / BEST
    return path if (path / COMPLETE).exists() else None


def model_checkpoint(path: Path | str) -> Path:
    """The checkpoint whose model a job that starts from a run uses (evaluation, export,
    alignment, teachers): a complete checkpoint folder as given, or a run directory's best
    validation checkpoint, else its latest.

    Raises:
        FileNotFoundError: neither (names the path).
    """
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    return best_checkpoint(path) or resolve_checkpoint(path)


def load_model(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load model weights in place (any world size: DCP reshards). Returns meta.json."""
    state = {"model": model.state_dict()}
    _load(state, path)
    model.load_state_dict(state["model"])
    return json.loads((path / META).read_text())


def rng_state() -> dict[str, torch.Tensor]:
    """This process's global RNG states as tensors (torch, CUDA, numpy, Python)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, _ = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_rest": torch.tensor([position, has_gauss, gauss], dtype=torch.float64),
        "python": torch.tensor([version, *python_state], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    position, has_gauss, gauss = state["numpy_rest"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(position), int(has_gauss), float(gauss)))
    version, *python_state = state["python"].tolist()
    random.setstate((version, tuple(python_state), None))


class Checkpointer:
    """Saves and restores a training run (collective: every rank calls every method).

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        config: the ``checkpoint`` section.
        rank, world_size: this process's place in the job.
    """

    def __init__(self, run_dir: Path | str, config: CheckpointConfig, rank: int, world_size: int):
        self.run_dir = Path(run_dir)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self._pending: tuple[Any, Path, dict[str, Any]] | None = None
        self._group: dist.ProcessGroup | None = None
        self._writer: ThreadPoolExecutor | None = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def due(self, step: int) -> bool:
        every = self.config.every_n_steps
        return every is not None and step % every == 0

    def save(
        self,
        state: CheckpointState,
        progress: Progress,
        extra_meta: dict[str, Any],
        best: bool = False,
    ) -> Path:
        """Writes ``step-<progress.step>``; complete (and older ones purged) once every rank is
        done, right away or, with ``async_save``, at the next save or :meth:`finish`. With
        ``best``, writes the best-validation checkpoint instead (:meth:`_save_best`).

        Args:
            state: the parts (``trainer.runtime.state``): shared tensors, this rank's tensors
                (stored under ``rank<r>`` with its RNG states), this rank's JSON positions.
            progress: step, epoch, rows, skipped steps.
            extra_meta: JSON-safe additions to meta.json (e.g. the resolved config).
        """
        self.finish()
        tensors = _without_empty(_tensor_state(state, self.rank))
        positions = {name: part.state_dict() for name, part in state.positions.items()}
        meta = {**extra_meta, **self._meta(progress, positions)}
        if best:
            return self._save_best(tensors, meta)
        path = checkpoint_dir(self.run_dir, progress.step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an interrupted save of the same step
        dist.barrier()
        if self.config.async_save:
            # Writes from a copy in a background thread, over a process group of its own so its
            # collectives never interleave with training's.
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
            assert self._writer is not None
            future = self._writer.submit(
                dcp.save, _snapshot(tensors), checkpoint_id=str(path), process_group=self._group
            )
            self._pending = (future, path, meta)
        else:
            dcp.save(tensors, checkpoint_id=str(path))
            self._mark_complete(path, meta)
        return path

    def _save_best(self, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """The best-validation checkpoint, synchronously (collective); the previous best is
        replaced only once the new one is complete."""
        best = checkpoints_root(self.run_dir) / BEST
        staging = best.with_name(f"{BEST}.partial")
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(staging))
        dist.barrier()
        if self.rank == 0:
            (staging / META).write_text(json.dumps(meta, indent=2))
            (staging / COMPLETE).touch()
            if best.exists():
                shutil.rmtree(best)
            staging.rename(best)
        dist.barrier()
        return best

    def _meta(self, progress: Progress, positions: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": progress.step,
            "epoch": progress.epoch,
            "rows": progress.rows,
            "skipped_steps": progress.skipped_steps,
            "row_digest": progress.row_digest,
            "world_size": self.world_size,
            "positions": _gather_json(positions, self.world_size),
            "layout": LAYOUT,
        }

    def finish(self) -> None:
        """Completes a pending asynchronous save (collective)."""
        if self._pending is None:
            return
        future, path, meta = self._pending
        self._pending = None
        future.result()
        self._mark_complete(path, meta)

    def _mark_complete(self, path: Path, meta: dict[str, Any]) -> None:
        dist.barrier()
        if self.rank == 0:
            (path / META).write_text(json.dumps(meta, indent=2))
            (path / COMPLETE).touch()
            self._purge(keep_from=_step_of(path))
        dist.barrier()

    def _purge(self, keep_from: int) -> None:
        """Keeps the newest ``keep_last`` complete checkpoints; drops older partial ones."""
        complete = complete_checkpoints(self.run_dir)
        for old in complete[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in checkpoints_root(self.run_dir).glob("step-*"):
            if not (partial / COMPLETE).exists() and _step_of(partial) < keep_from:
                shutil.rmtree(partial, ignore_errors=True)

    def restore(self, state: CheckpointState, path: Path | None = None) -> Restored | None:
        """Loads the latest complete checkpoint (or ``path``) into ``state``'s parts: the shared
        ones always, this rank's tensors, RNG and positions only at the saved world size. None
        when there is none."""
        path = path or latest_checkpoint(self.run_dir)
        if path is None:
            return None
        meta = json.loads((path / META).read_text())
        if meta.get("layout") != LAYOUT:
            raise CheckpointLayoutError(
                f"{path}: written with checkpoint layout {meta.get('layout', 1)}, this version "
                f"resumes layout {LAYOUT} only (named Stateful parts); start a new run.dir, or "
                "set checkpoint.resume=false to train this one from scratch (its checkpoints "
                "are kept until newer ones replace them)"
            )
        same = int(meta["world_size"]) == self.world_size
        tensors = _tensor_state(state, self.rank, with_rank=same)
        _load(_without_empty(tensors), path)
        for name, part in state.shared.items():
            part.load_state_dict(tensors[name])
        if same:
            rank_tensors = tensors[f"rank{self.rank}"]
            set_rng_state(rank_tensors["rng"])
            for name, part in state.rank.items():
                part.load_state_dict(rank_tensors[name])
            positions = meta["positions"][self.rank]
            for name, part in state.positions.items():
                if name in positions:
                    part.load_state_dict(positions[name])
        else:
            logger.warning(
                "%s was saved by %s ranks, resuming with %s: tables and optimizer state "
                "reshard, but data positions, RNG and cross-batch memory are per rank, so "
                "epoch %s restarts from its beginning",
                path,
                meta["world_size"],
                self.world_size,
                meta["epoch"],
            )
        progress = Progress(
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            rows=int(meta["rows"]),
            skipped_steps=int(meta.get("skipped_steps", 0)),
            row_digest=int(meta.get("row_digest", 0)),
        )
        return Restored(path, progress, same, meta)


def _tensor_state(state: CheckpointState, rank: int, with_rank: bool = True) -> dict[str, Any]:
    """The tensors DCP saves or loads: every shared part's state dict and (``with_rank``) this
    rank's parts with its RNG states under ``rank<r>``."""
    tensors: dict[str, Any] = {name: part.state_dict() for name, part in state.shared.items()}
    if not with_rank:
        return tensors
    rank_tensors = {name: part.state_dict() for name, part in state.rank.items()}
    tensors[f"rank{rank}"] = {**rank_tensors, "rng": rng_state()}
    return tensors


def _without_empty(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without empty nested dicts (DCP saves nothing for them, then cannot load
    them). The leaves are the same tensor objects, so loading still fills the caller's."""
    kept: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = _without_empty(value)
            if not value:
                continue
        kept[key] = value
    return kept


def _snapshot(state: Any) -> Any:
    """A copy of ``state`` that training can go on changing: tensors cloned, sharded tensors
    rebuilt around cloned local shards (same global metadata)."""
    if isinstance(state, dict):
        return {key: _snapshot(value) for key, value in state.items()}
    if isinstance(state, ShardedTensor):
        shards = [
            Shard(tensor=shard.tensor.detach().clone(), metadata=shard.metadata)
            for shard in state.local_shards()
        ]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, state.metadata(), process_group=state._process_group
        )
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    return state


def _gather_json(value: dict[str, Any], world_size: int) -> list[Any]:
    """Every rank's JSON-safe ``value``, in rank order (collective)."""
    encoded = json.dumps(value)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, encoded)
    return [json.loads(item) for item in gathered]
