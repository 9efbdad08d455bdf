"""Model checkpoints with torch.distributed.checkpoint (sharded tables stay sharded on disk).

A checkpoint lives in ``<run>/checkpoints/step-N`` and is valid only once ``.complete`` exists,
written by rank 0 after every rank finished saving; loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

COMPLETE = ".complete"


def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    model: nn.Module,
    meta: dict[str, Any],
    is_main: bool,
    samplers: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank writes its shards; rank 0 marks the folder complete.

    ``samplers`` holds replicated sampler state (tensors, e.g. the frequency estimator)."""
    path = checkpoint_dir(run_dir, step)
    if is_main and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    state: dict[str, Any] = {"model": model.state_dict()}
    if samplers:
        state["samplers"] = samplers
    dcp.save(state, checkpoint_id=str(path))
    dist.barrier()
    if is_main:
        (path / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        (path / COMPLETE).touch()
    dist.barrier()
    return path


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return None
    complete = [p for p in root.glob("step-*") if (p / COMPLETE).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_model(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load model weights in place (any world size: DCP reshards). Returns meta.json."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    return json.loads((path / "meta.json").read_text())
