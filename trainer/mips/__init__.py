"""Exact maximum-inner-product search: top-K over a corpus in one process (``exact_topk``) and
over a corpus sharded across ranks (``distributed_topk``: queries all-gathered, per-shard top-K
merged), equal to a float64 brute force. ``topk`` holds the API and the distributed merge,
``sweep`` the blocked sweep that makes it fast, ``candidates`` its per-query buffer, and
``precision`` the error bounds that keep its float32 / bf16 filters exact. Imports only torch.
"""

from trainer.mips.topk import (
    ItemLists,
    bruteforce_topk,
    distributed_topk,
    exact_topk,
    resolved_filter_precision,
    score_error_bound,
    shard_range,
)

__all__ = [
    "ItemLists",
    "bruteforce_topk",
    "distributed_topk",
    "exact_topk",
    "resolved_filter_precision",
    "score_error_bound",
    "shard_range",
]
