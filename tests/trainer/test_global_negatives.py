"""Global in-batch softmax over 2 gloo ranks equals one softmax over the concatenated batch."""

from __future__ import annotations

import torch

from models.losses import in_batch_softmax_loss, sampled_softmax_loss
from tests.dist_helpers import run_distributed
from trainer.negatives.global_negatives import gather_candidates

SIZES = (5, 3)  # uneven: the last batch of an epoch differs across ranks
IDS = torch.tensor([0, 1, 2, 3, 1, 4, 0, 5])  # items 0 and 1 repeat across ranks


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    user = torch.nn.functional.normalize(torch.randn(8, 4, generator=generator), dim=1)
    item = torch.nn.functional.normalize(torch.randn(8, 4, generator=generator), dim=1)
    return user, item


def _rank(rank: int, world_size: int) -> dict:
    user, item = _global_batch()
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    user = user[rows].clone().requires_grad_()
    item = item[rows].clone().requires_grad_()
    ids = IDS[rows]
    candidates, candidate_ids, positive_index = gather_candidates(item, ids)
    loss = sampled_softmax_loss(
        user, candidates, candidate_ids, positive_index, torch.ones(len(ids)), 0.1
    )
    # Per-row sums make the two ranks' losses add up to the global one.
    (loss * len(ids)).backward()
    return {"loss_sum": float(loss) * len(ids), "user_grad": user.grad, "item_grad": item.grad}


def test_global_softmax_matches_single_process() -> None:
    results = run_distributed(_rank, 2)
    user, item = _global_batch()
    user.requires_grad_()
    item.requires_grad_()
    loss = in_batch_softmax_loss(user, item, IDS, torch.ones(8), 0.1)
    (loss * 8).backward()
    assert abs(sum(r["loss_sum"] for r in results) - float(loss) * 8) < 1e-4
    torch.testing.assert_close(torch.cat([r["user_grad"] for r in results]), user.grad)
    torch.testing.assert_close(torch.cat([r["item_grad"] for r in results]), item.grad)
