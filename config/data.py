"""The ``data`` section: where the shards are and how batches are read."""

from __future__ import annotations

from dataclasses import dataclass

from config.errors import Fail
from config.features import IdPolicy


@dataclass
class DataConfig:
    path: str = "data/ml-100k"
    train_split: str = "train"
    batch_size: int = 512
    eval_batch_size: int = 2048
    num_workers: int = 1
    # Rows are shuffled inside windows of this many row groups (resumable without saving rows).
    shuffle_window_row_groups: int = 4
    shuffle: bool = True
    id_policy: IdPolicy = IdPolicy.ERROR
    # Newest history items pooled as an extra feature `hist_recent_item_ids` (0 = not derived).
    recent_history: int = 0
    verify_checksums: bool = True


def validate_data(data: DataConfig, fail: Fail) -> None:
    if data.batch_size < 2:
        fail("data.batch_size", "in-batch negatives need at least 2 rows per batch")
    if data.num_workers < 0:
        fail("data.num_workers", "must be >= 0")
    if data.recent_history < 0:
        fail("data.recent_history", "must be >= 0")
    if data.shuffle_window_row_groups < 1:
        fail("data.shuffle_window_row_groups", "must be >= 1")
