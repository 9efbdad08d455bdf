"""Keeps ranks in step over uneven data: sharded tables and DDP need every rank in every
collective, so while any rank still has a batch, a rank that ran out feeds zero-weight padding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from data_pipeline.batch import Batch
from trainer.runtime.distributed import DistributedEnv, any_rank_has


def synchronized(
    batches: Iterable[Batch],
    env: DistributedEnv,
    fallback: Callable[[], Batch] | None = None,
) -> Iterator[Batch]:
    """Yields this rank's batches (on ``env.device``) until every rank is out of data.

    A rank that ran out yields its last batch again with ``weight`` 0 (padding: no row is
    dropped or counted twice). A rank that had no batch at all uses ``fallback()``, or raises.
    Consumers tell padding rows by ``batch.weight == 0``.
    """
    last: Batch | None = None
    iterator = iter(batches)
    try:
        while True:
            batch = next(iterator, None)
            if not any_rank_has(batch is not None, env.device):
                return
            if batch is None:
                if last is None and fallback is None:
                    raise RuntimeError(
                        f"rank {env.rank} received no data this epoch while other ranks did: "
                        "the split has fewer row groups than ranks x loader workers"
                    )
                batch = (last if last is not None else fallback()).as_padding()  # type: ignore[misc]
            last = batch
            yield batch.to(env.device, non_blocking=True)
    finally:
        # Loader workers stop here, when the consumer stops (a step limit, a signal, an
        # error), not whenever the iterator is collected, possibly at interpreter exit.
        shutdown_workers = getattr(iterator, "_shutdown_workers", None)
        if shutdown_workers is not None:
            shutdown_workers()
