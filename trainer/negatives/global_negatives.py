"""Global in-batch negatives: every rank's items become candidates for every rank's rows.

The gather is differentiable (``torch.distributed.nn.functional.all_gather``): the gradient a
rank's rows put on another rank's items is sent back to the owner, so the sum of the ranks'
losses has exactly the gradient of one softmax over the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as differentiable_all_gather


def gather_candidates(
    item: torch.Tensor, item_ids: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' items as one candidate set (ranks may hold different batch sizes).

    Args:
        item: [B_r, D] this rank's positive item embeddings.
        item_ids: [B_r] their ids.
    Returns:
        candidates [W * B_max, D] (padding rows are zeros), candidate ids [W * B_max] (-1 on
        padding), and this rank's rows' positive columns [B_r].
    """
    rank = dist.get_rank(group)
    size = torch.tensor([item.shape[0]], device=item.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(int(s.item()) for s in sizes))
    pad = longest - item.shape[0]
    gathered = differentiable_all_gather(F.pad(item, (0, 0, 0, pad)), group=group)
    padded_ids = F.pad(item_ids, (0, pad), value=-1)
    ids = [torch.empty_like(padded_ids) for _ in sizes]
    dist.all_gather(ids, padded_ids, group=group)
    positive_index = rank * longest + torch.arange(item.shape[0], device=item.device)
    return torch.cat(gathered), torch.cat(ids), positive_index
