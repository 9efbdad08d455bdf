"""Streaming item frequencies for the log-Q correction of in-batch and memory negatives.

``StreamingFrequencyEstimator`` estimates, online, the probability that one training row's item
is j (its expected count among C rows is C times that), from an exponentially decayed count-min
sketch over ``hash_slots``; ``update_synchronized`` feeds it every rank's ids (``gather_ids``),
so every rank holds the same state. The corpus samplers and the cross-batch memory are in
:mod:`data_pipeline.negatives`.

Nothing here touches the model; every tensor stays on the device it was built for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Distinct odd multipliers below 2**31 (MurmurHash, xxHash32, golden-ratio, lowbias32 constants):
# products with 32-bit keys stay below 2**63, so int64 arithmetic never overflows on any device.
HASH_MULTIPLIERS = (
    0x5BD1E995,
    0x27D4EB2F,
    0x61C88647,
    0x7FEB352D,
    0x1B873593,
    0x165667B1,
    0x2C1B3C6D,
    0x297A2D39,
)
_HIGH_BITS_MULTIPLIER = 0x4CF5AD43  # folds bits 32..63 of an id into the 32-bit key
_MASK_32 = 0xFFFFFFFF


def hash_slots(ids: Tensor, multipliers: Sequence[int], hash_size: int) -> Tensor:
    """Multiply-shift hash of int64 ids into ``[0, hash_size)``, one row per multiplier.

    The high 32 bits are folded into the low 32 first, then ``(key * m mod 2**32) >> (32 - bits)``;
    every product stays below 2**63, so results are identical on every device and process.

    Args:
        ids: [n] int64.
        multipliers: [H] odd integers below 2**31.
        hash_size: power of two, at most 2**31.
    Returns:
        [H, n] int64 slots.
    """
    bits = hash_size.bit_length() - 1
    low = ids & _MASK_32
    high = (ids >> 32) & _MASK_32
    key = low ^ ((high * _HIGH_BITS_MULTIPLIER) & _MASK_32)
    factors = torch.tensor(multipliers, dtype=torch.int64, device=ids.device).unsqueeze(1)
    return ((key.unsqueeze(0) * factors) & _MASK_32) >> (32 - bits)


class StreamingFrequencyEstimator:
    """Per-draw probability of each item in the training stream, from a decayed count-min sketch.

    ``probability(j)`` estimates p(j), the chance that one training row's item is j, so the
    expected number of copies of j among C rows drawn from the stream is ``C * p(j)``; head
    items with ``B * p(j) > 1`` get their full count (Yi et al. 2019's "steps since last seen"
    estimates P(j appears in a batch), which saturates at 1 and under-corrects them by up to
    ``log(B * p(j))``).

    Estimator: for every hash function, a slot holds the exponentially decayed count
    ``S = sum_t (1 - alpha) ** (T - t) * c_t`` of the ids hashed to it (c_t: copies in the batch
    of step t, every copy counted), and one scalar holds the decayed number of rows
    ``R = sum_t (1 - alpha) ** (T - t) * n_t``. Then ``p(j) = min over hashes of S / R``:

    - S / R is the exponentially weighted frequency of j among the rows, so it follows drift
      with a time constant of ``1 / alpha`` steps, and its relative standard deviation is about
      ``sqrt(alpha / (2 * B * p))`` for Poisson counts.
    - Both sums start at 0 and decay alike, so the ratio has no start-up bias (no prior, no
      special first sighting) and varying batch sizes (padding, the last batch, uneven ranks)
      are weighted by their actual rows.
    - Collisions only add counts, so the least-collided hash function (the min) is the best
      estimate, as in a count-min sketch.
    - Decay is applied lazily: a slot remembers the step it was last updated, so an update
      costs O(n log n) for n ids, not O(hash_size).
    - Items whose decayed count is below one sighting (never seen, or seen once long ago) get
      ``1 / R``, "at most once in the window"; before the first update p = 1 (log p = 0).

    Call ``update`` (or ``update_synchronized`` on every rank) once per step with the whole
    batch; steps must increase from call to call.

    Args:
        hash_size: slots per hash function, a power of two (at most 2**31).
        num_hashes: number of hash functions, 1 to ``len(HASH_MULTIPLIERS)``.
        alpha: decay per step in (0, 1]; 1 keeps only the latest batch.
        device: where the [num_hashes, hash_size] arrays live.
    """

    def __init__(
        self,
        hash_size: int = 2**20,
        num_hashes: int = 2,
        alpha: float = 0.01,
        device: torch.device | str = "cpu",
    ) -> None:
        if hash_size < 1 or hash_size > 2**31 or hash_size & (hash_size - 1):
            raise ValueError(f"hash_size must be a power of two <= 2**31, got {hash_size}")
        if not 1 <= num_hashes <= len(HASH_MULTIPLIERS):
            raise ValueError(
                f"num_hashes must be in [1, {len(HASH_MULTIPLIERS)}], got {num_hashes}"
            )
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.hash_size = hash_size
        self.num_hashes = num_hashes
        self.alpha = alpha
        self.device = torch.device(device)
        self.multipliers = HASH_MULTIPLIERS[:num_hashes]
        shape = (num_hashes, hash_size)
        # Decayed count of each slot as of the step in last_seen_step (-1: never seen).
        self.decayed_count = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.last_seen_step = torch.full(shape, -1, dtype=torch.int64, device=self.device)
        self.decayed_rows = 0.0  # R as of last_step
        self.first_step = -1  # step of the first update; -1 before it
        self.last_step = -1  # step of the latest update

    @property
    def steps_observed(self) -> int:
        """Number of batches (steps) the estimator has seen, counted from the first update."""
        return 0 if self.first_step < 0 else self.last_step - self.first_step + 1

    def update(self, ids: Tensor, step: int) -> None:
        """Record one global batch.

        Args:
            ids: [n] int64 item ids of the batch; every copy counts, ids < 0 are padding.
            step: training step, greater than the previous update's.
        """
        if step < 0 or step <= self.last_step:
            raise ValueError(f"step must be >= 0 and increase, got {step} after {self.last_step}")
        ids = ids.to(self.device, torch.int64).reshape(-1)
        ids = ids[ids >= 0]
        elapsed = 0 if self.last_step < 0 else step - self.last_step
        self.decayed_rows = self.decayed_rows * (1.0 - self.alpha) ** elapsed + ids.numel()
        if self.first_step < 0:
            self.first_step = step
        self.last_step = step
        if ids.numel() == 0:
            return
        flat = self._flat_slots(ids).reshape(-1)  # [H * n]
        slots, copies = torch.unique(flat, return_counts=True)
        count = self.decayed_count.view(-1)
        seen = self.last_seen_step.view(-1)
        count[slots] = self._decayed(count[slots], seen[slots], step) + copies.to(count.dtype)
        seen[slots] = step

    def update_synchronized(
        self, local_ids: Tensor, step: int, group: dist.ProcessGroup | None = None
    ) -> None:
        """``update`` with the ids of every rank in ``group``, so every rank holds the same state.

        Ranks may pass different numbers of ids. Without an initialized process group this is
        ``update(local_ids, step)``.

        Args:
            local_ids: [n] int64 this rank's item ids (ids < 0 are padding).
            step: training step, the same on every rank.
            group: process group; the default group when None.
        """
        if not (dist.is_available() and dist.is_initialized()):
            self.update(local_ids, step)
            return
        self.update(gather_ids(local_ids.to(self.device, torch.int64).reshape(-1), group), step)

    def probability(self, ids: Tensor) -> Tensor:
        """Estimated probability that one row of the stream is each item (one draw).

        Args:
            ids: [n] int64 item ids.
        Returns:
            [n] float32 in (0, 1]; multiply by a candidate count for an expected count.
        """
        ids = ids.to(self.device, torch.int64).reshape(-1)
        if self.decayed_rows <= 0:
            return torch.ones(ids.shape, dtype=torch.float32, device=self.device)
        flat = self._flat_slots(ids)  # [H, n]
        count = self._decayed(
            self.decayed_count.view(-1)[flat], self.last_seen_step.view(-1)[flat], self.last_step
        )
        return (count.amin(0).clamp(min=1.0) / self.decayed_rows).to(torch.float32)

    def log_probability(self, ids: Tensor) -> Tensor:
        """log ``probability(ids)``: [n] ids -> [n] float32 <= 0."""
        return torch.log(self.probability(ids))

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (the arrays themselves, not copies), for torch.distributed.checkpoint."""
        return {
            "decayed_count": self.decayed_count,
            "last_seen_step": self.last_seen_step,
            "decayed_rows": torch.tensor(self.decayed_rows, dtype=torch.float64),
            "first_step": torch.tensor(self.first_step, dtype=torch.int64),
            "last_step": torch.tensor(self.last_step, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from ``state_dict()``; shapes must match this estimator's configuration.

        Raises:
            ValueError: a key is missing (e.g. a checkpoint of the older per-batch-appearance
                estimator, which stored ``interval``) or an array's shape differs.
        """
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(
                f"frequency estimator state lacks {missing} (keys: {sorted(state)}); a "
                "checkpoint of the older per-batch-appearance estimator cannot be resumed"
            )
        arrays = {"decayed_count": self.decayed_count, "last_seen_step": self.last_seen_step}
        copy_state(arrays, state, "(num_hashes, hash_size)")
        self.decayed_rows = float(state["decayed_rows"])
        self.first_step = int(state["first_step"])
        self.last_step = int(state["last_step"])

    def _flat_slots(self, ids: Tensor) -> Tensor:
        """[n] ids -> [H, n] positions in the flattened [H * hash_size] arrays."""
        slots = hash_slots(ids, self.multipliers, self.hash_size)
        offsets = torch.arange(self.num_hashes, device=self.device).unsqueeze(1) * self.hash_size
        return slots + offsets

    def _decayed(self, count: Tensor, last_seen: Tensor, step: int) -> Tensor:
        """Counts [k] stored at steps ``last_seen`` [k] (-1: never) decayed to ``step``."""
        elapsed = (step - last_seen).to(torch.float64)
        factor = torch.pow(1.0 - self.alpha, elapsed).to(count.dtype)
        return torch.where(last_seen >= 0, count * factor, torch.zeros_like(count))


def copy_state(targets: dict[str, Tensor], state: dict[str, Tensor], shape_meaning: str) -> None:
    """Copy ``state[key]`` into each target array in place; a shape mismatch names the key."""
    for key, target in targets.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise ValueError(
                f"state '{key}' has shape {tuple(state[key].shape)}, expected "
                f"{tuple(target.shape)} {shape_meaning}"
            )
        target.copy_(state[key])


def gather_ids(local_ids: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """All ranks' ids concatenated in rank order; sizes may differ between ranks.

    Args:
        local_ids: [n_rank] int64 on the backend's device.
    Returns:
        [sum over ranks of n_rank] int64, identical on every rank.
    """
    world_size = dist.get_world_size(group)
    size = torch.tensor([local_ids.numel()], dtype=torch.int64, device=local_ids.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    if longest == 0:
        return local_ids
    padded = torch.full((longest,), -1, dtype=torch.int64, device=local_ids.device)
    padded[: local_ids.numel()] = local_ids
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([ids[:count] for ids, count in zip(gathered, counts)])
