"""Negative sampling for two-tower retrieval: corpus samplers, item frequencies, cross-batch memory.

Three sources of negatives and the statistics their corrections need:

- ``CorpusSampler`` draws items from the corpus (uniform or unigram ** alpha) and knows the exact
  log-probability of each draw, for sampled-softmax log-Q correction.
- ``item_counts`` counts item ids over Parquet shards, one row group at a time, to build the
  unigram distribution.
- ``StreamingFrequencyEstimator`` estimates, online, the probability that one training row's
  item is j (its expected count among C rows is C times that), for the log-Q correction of
  in-batch and memory negatives.
- ``CrossBatchMemory`` keeps recent item embeddings as extra negatives (Wang et al. 2020).

Nothing here touches the model; every tensor stays on the device it was built for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import Tensor

from data_pipeline.schema import SchemaError

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


# ---------------------------------------------------------------------------------------------
# Corpus sampler
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CorpusSampler:
    """Draws negatives from the item corpus with replacement, by inverse-CDF lookup.

    Build it with ``uniform``, ``unigram`` or ``from_weights``; the CDF is computed once, so a
    draw of ``num`` items costs O(num log N).

    Args:
        item_ids: [N] int64 corpus ids, distinct, in the order of ``cdf``.
        cdf: [N] float64 cumulative probabilities; ``cdf[-1] == 1``.
        log_probs: [N] float32 log-probability of each item in one draw.
        sorted_ids: [N] int64 ``item_ids`` sorted, for id -> position lookups.
        sorted_positions: [N] int64 position in ``item_ids`` of each entry of ``sorted_ids``.
    """

    item_ids: Tensor
    cdf: Tensor
    log_probs: Tensor
    sorted_ids: Tensor
    sorted_positions: Tensor

    @classmethod
    def from_weights(cls, item_ids: Tensor, weights: Tensor) -> CorpusSampler:
        """Sampler with probability proportional to ``weights``.

        Args:
            item_ids: [N] int64 distinct corpus ids.
            weights: [N] finite, non-negative, with a positive sum.
        Raises:
            ValueError: empty corpus, repeated ids, mismatched shapes or invalid weights.
        """
        if item_ids.dim() != 1 or item_ids.numel() == 0:
            raise ValueError(
                f"item_ids must be a non-empty [N] tensor, got {tuple(item_ids.shape)}"
            )
        if item_ids.dtype != torch.int64:
            raise ValueError(f"item_ids must be int64, got {item_ids.dtype}")
        if weights.shape != item_ids.shape:
            raise ValueError(
                f"weights shape {tuple(weights.shape)} != item_ids shape {tuple(item_ids.shape)}"
            )
        weights = weights.to(torch.float64)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        total = weights.sum()
        if not float(total) > 0:
            raise ValueError("weights must have a positive sum")
        sorted_ids, sorted_positions = torch.sort(item_ids)
        repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if repeated.numel():
            raise ValueError(f"item_ids repeat ids {repeated.unique()[:10].tolist()}")
        probabilities = weights / total
        cdf = torch.cumsum(probabilities, 0)
        cdf = cdf / cdf[-1]  # exactly 1 at the end, so every uniform draw in [0, 1) lands
        return cls(
            item_ids=item_ids,
            cdf=cdf,
            log_probs=torch.log(probabilities).to(torch.float32),
            sorted_ids=sorted_ids,
            sorted_positions=sorted_positions,
        )

    @classmethod
    def uniform(cls, item_ids: Tensor) -> CorpusSampler:
        """Every item with probability 1 / N.

        Args:
            item_ids: [N] int64 distinct corpus ids.
        """
        return cls.from_weights(item_ids, torch.ones_like(item_ids, dtype=torch.float64))

    @classmethod
    def unigram(cls, item_ids: Tensor, counts: Tensor, alpha: float) -> CorpusSampler:
        """Probability proportional to ``(count + 1) ** alpha``.

        The +1 gives items never seen in training (count 0) a positive probability, so they
        can still be drawn as negatives. ``alpha = 0`` is uniform, ``alpha = 1`` the smoothed
        unigram distribution; word2vec's 0.75 sits between.

        Args:
            item_ids: [N] int64 distinct corpus ids.
            counts: [N] non-negative occurrence counts, aligned with ``item_ids``.
            alpha: finite exponent >= 0.
        """
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        counts = counts.to(torch.float64)
        if bool((counts < 0).any()):
            raise ValueError("counts must be non-negative")
        return cls.from_weights(item_ids, (counts + 1.0) ** alpha)

    def __len__(self) -> int:
        return self.item_ids.numel()

    def sample(self, num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``num`` items with replacement; deterministic given ``generator``'s state.

        Args:
            num: number of draws, >= 0.
            generator: on the sampler's device.
        Returns:
            ids: [num] int64 corpus ids.
            log_prob: [num] float32 log-probability of each id in a single draw.
        """
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        uniforms = torch.rand(num, generator=generator, dtype=torch.float64, device=self.cdf.device)
        positions = torch.searchsorted(self.cdf, uniforms, right=True)
        positions = positions.clamp_(max=len(self) - 1)  # guards a rounding edge only
        return self.item_ids[positions], self.log_probs[positions]

    def log_prob(self, ids: Tensor, strict: bool = True) -> Tensor:
        """Log-probability of drawing each id in one draw.

        Args:
            ids: [n] int64 ids.
            strict: ids outside the corpus raise; False gives them -inf (never drawn), for
                ids that merely may also be corpus samples (in-batch and memory items).
        Returns:
            [n] float32.
        Raises:
            ValueError: ``strict`` and some ids are not in the corpus (names up to 10 of them).
        """
        ids = ids.to(self.sorted_ids.device, torch.int64)
        found_at = torch.searchsorted(self.sorted_ids, ids).clamp_(max=len(self) - 1)
        found = self.sorted_ids[found_at] == ids
        log_probs = self.log_probs[self.sorted_positions[found_at]]
        if bool(found.all()):
            return log_probs
        if not strict:
            return log_probs.masked_fill(~found, float("-inf"))
        missing = ids[~found].unique()[:10].tolist()
        raise ValueError(f"ids not in the sampler's corpus: {missing}")


# ---------------------------------------------------------------------------------------------
# Item counts from Parquet
# ---------------------------------------------------------------------------------------------


def item_counts(paths: Sequence[Path | str], num_items: int, column: str = "item_id") -> np.ndarray:
    """Occurrences of each item id over ``paths``, read one row group at a time.

    Args:
        paths: Parquet files with an integer ``column``.
        num_items: ids must lie in [0, num_items).
        column: name of the id column.
    Returns:
        [num_items] int64 counts.
    Raises:
        SchemaError (a ValueError): missing or non-integer column, null ids, or ids outside
            [0, num_items); the message names file, row group and column.
    """
    if num_items <= 0:
        raise ValueError(f"num_items must be positive, got {num_items}")
    counts = np.zeros(num_items, dtype=np.int64)
    for path in paths:
        with pq.ParquetFile(path) as parquet:
            _check_id_column(parquet.schema_arrow, path, column)
            for row_group in range(parquet.num_row_groups):
                values = parquet.read_row_group(row_group, columns=[column]).column(column)
                where = f"{path}: row group {row_group}: column '{column}'"
                counts += _count_row_group(values, num_items, where)
    return counts


def _check_id_column(schema: pa.Schema, path: Path | str, column: str) -> None:
    if column not in schema.names:
        raise SchemaError(f"{path}: no column '{column}' (columns: {schema.names})")
    field_type = schema.field(column).type
    if not pa.types.is_integer(field_type):
        raise SchemaError(f"{path}: column '{column}' has type {field_type}, expected integers")


def _count_row_group(values: pa.ChunkedArray, num_items: int, where: str) -> np.ndarray:
    """[num_items] int64 bincount of one row group's ids; ``where`` names file, row group, column."""
    if values.null_count:
        raise SchemaError(f"{where}: {values.null_count} null ids")
    ids = values.to_numpy().astype(np.int64, copy=False)
    if ids.size == 0:
        return np.zeros(num_items, dtype=np.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_items:
        raise SchemaError(f"{where}: ids in [{low}, {high}] outside [0, {num_items})")
    return np.bincount(ids, minlength=num_items)


# ---------------------------------------------------------------------------------------------
# Streaming frequency estimator
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Cross-batch memory
# ---------------------------------------------------------------------------------------------


class CrossBatchMemory:
    """FIFO of recent item embeddings reused as extra negatives (Wang et al. 2020, XBM).

    Stored embeddings are detached copies: they carry no gradient and drift from the current
    item tower as training moves on, hence ``max_staleness_steps``. Entries are past in-batch
    rows, duplicates kept, so they follow the data distribution and share the in-batch items'
    logQ correction; the trainer routes their item-side gradient to each row's positive
    (``trainer.negatives.negative_sampling.routed_memory_scores``). Call ``negatives(step)`` before
    ``push``-ing the current batch, or the batch's own positives come back as negatives.

    Args:
        capacity: M, the most entries kept; the oldest are overwritten first.
        dim: D, embedding size.
        warmup_steps: ``negatives`` returns nothing while ``step < warmup_steps`` (the item
            tower changes fastest early on, so its old embeddings are poor negatives).
        max_staleness_steps: entries older than this many steps are not returned.
        device: where the [M, D] buffer lives.
        dtype: storage type of the embeddings.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        warmup_steps: int = 0,
        max_staleness_steps: int = 1_000_000,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be positive, got {capacity}, {dim}")
        if warmup_steps < 0 or max_staleness_steps < 0:
            raise ValueError(
                f"warmup_steps and max_staleness_steps must be >= 0, got {warmup_steps}, "
                f"{max_staleness_steps}"
            )
        self.capacity = capacity
        self.dim = dim
        self.warmup_steps = warmup_steps
        self.max_staleness_steps = max_staleness_steps
        self.device = torch.device(device)
        self.embeddings = torch.zeros(capacity, dim, dtype=dtype, device=self.device)
        self.ids = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.inserted_step = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.next_position = 0  # ring-buffer slot the next entry is written to
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, embeddings: Tensor, ids: Tensor, step: int) -> None:
        """Store detached copies of a batch's item embeddings.

        Args:
            embeddings: [n, D] item embeddings.
            ids: [n] int64 item ids; rows with ids < 0 are padding and are not stored.
            step: training step the embeddings were computed at.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [n, {self.dim}], got {tuple(embeddings.shape)}")
        if ids.shape != embeddings.shape[:1]:
            raise ValueError(f"ids must be [{embeddings.shape[0]}], got {tuple(ids.shape)}")
        ids = ids.to(self.device, torch.int64)
        keep = ids >= 0
        rows = embeddings.detach().to(self.device, self.embeddings.dtype)[keep][-self.capacity :]
        ids = ids[keep][-self.capacity :]
        count = ids.numel()
        if count == 0:
            return
        positions = (self.next_position + torch.arange(count, device=self.device)) % self.capacity
        self.embeddings[positions] = rows
        self.ids[positions] = ids
        self.inserted_step[positions] = step
        self.next_position = (self.next_position + count) % self.capacity
        self.size = min(self.size + count, self.capacity)

    def negatives(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Entries with ``0 <= step - inserted_step <= max_staleness_steps``, oldest first.

        Returns:
            embeddings: [m, D] (no grad).
            ids: [m] int64.
            age_steps: [m] int64, ``step - inserted_step``.
            All empty (m = 0) while ``step < warmup_steps``.
        """
        if step < self.warmup_steps or self.size == 0:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return self.embeddings[:0].clone(), empty, empty.clone()
        oldest = self.next_position if self.size == self.capacity else 0
        order = (oldest + torch.arange(self.size, device=self.device)) % self.capacity
        age = step - self.inserted_step[order]
        order = order[(age >= 0) & (age <= self.max_staleness_steps)]
        return self.embeddings[order], self.ids[order], step - self.inserted_step[order]

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (the buffers themselves, not copies), for torch.distributed.checkpoint."""
        return {
            "embeddings": self.embeddings,
            "ids": self.ids,
            "inserted_step": self.inserted_step,
            "next_position": torch.tensor(self.next_position, dtype=torch.int64),
            "size": torch.tensor(self.size, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from ``state_dict()``; capacity and dim must match."""
        arrays = {
            "embeddings": self.embeddings,
            "ids": self.ids,
            "inserted_step": self.inserted_step,
        }
        copy_state(arrays, state, "(capacity, dim)")
        self.next_position = int(state["next_position"])
        self.size = int(state["size"])
