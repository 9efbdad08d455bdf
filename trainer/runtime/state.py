"""What a checkpoint holds, as named ``Stateful`` parts (``state_dict`` / ``load_state_dict``),
the way torchtitan's checkpoint manager takes them.

A job names its parts (model, optimizers, samplers, validation state); the training loop adds
its own (progress counts, the open logging window, the loader position). Three kinds:

- ``shared``: replicated or sharded tensors, the same keys on every rank (DCP reshards them to
  any world size);
- ``rank``: this rank's own tensors (RNG states, cross-batch memory), restored only at the world
  size they were saved with;
- ``positions``: this rank's JSON-safe state (data-loader position, logging window), kept in
  ``meta.json`` and restored only at the same world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful


def _loaded_in_place(state: dict[str, Any]) -> None:
    """Nothing to apply: DCP wrote into the live tensors ``state_dict`` returned."""
    del state


@dataclass
class StatePart:
    """A ``Stateful`` from two callables.

    Args:
        save: returns the part's state dict. For tensor parts, the live tensors (DCP loads in
            place into what it returns).
        load: applies a loaded state dict (default: nothing; the tensors were filled in place).
    """

    save: Callable[[], dict[str, Any]]
    load: Callable[[dict[str, Any]], None] = _loaded_in_place

    def state_dict(self) -> dict[str, Any]:
        return self.save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load(state_dict)


def module_part(module: nn.Module) -> StatePart:
    """A model's parameters and buffers (sharded tables stay ``ShardedTensor``)."""
    return StatePart(module.state_dict, module.load_state_dict)


def optimizer_part(optimizer: Any) -> StatePart:
    """A torchrec ``KeyedOptimizer``'s state (keyed by parameter name; the fused table
    optimizer's sharded like its tables): tensors load in place, and a Python number in the
    state (``SparseAdam``'s step count) travels as a 0-d tensor and is written back."""

    def save() -> dict[str, Any]:
        state = optimizer.state_dict()["state"]
        return {
            name: {key: _as_tensor(value) for key, value in entries.items()}
            for name, entries in state.items()
        }

    def load(state: dict[str, Any]) -> None:
        for name, entries in state.items():
            param = optimizer.params.get(name)
            live = optimizer.state.get(param, {}) if param is not None else {}
            for key, value in entries.items():
                current = live.get(key)
                if current is not None and not isinstance(current, torch.Tensor):
                    live[key] = type(current)(value.item())

    return StatePart(save, load)


def _as_tensor(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def tensor_part(get: Callable[[], torch.Tensor], put: Callable[[torch.Tensor], None]) -> StatePart:
    """One tensor made on demand by ``get`` and applied by ``put`` after loading."""
    return StatePart(lambda: {"value": get()}, lambda state: put(state["value"]))


def sharded_model_parts(model: Any, dense_optimizer: Any) -> dict[str, Stateful]:
    """The shared parts of a DMP-sharded model: its state, its fused table optimizer's and
    the dense optimizer's."""
    return {
        "model": module_part(model),
        "sparse_optimizer": optimizer_part(model.fused_optimizer),
        "dense_optimizer": optimizer_part(dense_optimizer),
    }


@dataclass
class CheckpointState:
    """The parts of one checkpoint (see the module docstring for the three kinds)."""

    shared: dict[str, Stateful] = field(default_factory=dict)
    rank: dict[str, Stateful] = field(default_factory=dict)
    positions: dict[str, Stateful] = field(default_factory=dict)

    def merged(self, other: CheckpointState) -> CheckpointState:
        """These parts and ``other``'s (``other`` wins on a name both have)."""
        return CheckpointState(
            {**self.shared, **other.shared},
            {**self.rank, **other.rank},
            {**self.positions, **other.positions},
        )
