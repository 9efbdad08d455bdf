"""Negative sampling for two-tower retrieval: corpus samplers and cross-batch memory.

Sources of negatives beyond the batch itself, and the counts the corpus sampler is built from:

- ``CorpusSampler`` draws items from the corpus (uniform or unigram ** alpha) and knows the exact
  log-probability of each draw, for sampled-softmax log-Q correction.
- ``item_counts`` counts item ids over Parquet shards, one row group at a time, to build the
  unigram distribution.
- ``CrossBatchMemory`` keeps recent item embeddings as extra negatives (Wang et al. 2020).

The streaming item frequencies that correct in-batch and memory negatives are in
:mod:`data_pipeline.streaming_frequency`.

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
from torch import Tensor

from data_pipeline.schema import SchemaError
from data_pipeline.streaming_frequency import copy_state

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
