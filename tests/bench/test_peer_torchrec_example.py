"""``bench.peer_torchrec_example``: TrainPipelineSparseDist on CPU/gloo trains the same steps as
the plain forward/backward/step loop (it only reorders input_dist), and training lowers the loss
on the batches it has seen."""

from __future__ import annotations

import torch

from bench.peer_torchrec_example import Pipeline, build_task, random_batches, shard, step_function
from tests.dist_helpers import run_distributed

ROWS, DIM, BATCH = 50, 8, 32
CYCLE = 10  # RandomRecDataset generates this many batches and cycles them
STEPS = 3 * CYCLE


def _losses(rank: int, world_size: int, pipeline: Pipeline) -> list[float]:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, optimizer, _ = shard(build_task(ROWS, DIM, (16, 8), device), device, BATCH)
    batches = random_batches(BATCH, ROWS, seed=rank)
    step = step_function(pipeline, model, optimizer, device, batches)
    return [float(step()[0]) for _ in range(STEPS)]


def _both(rank: int, world_size: int) -> dict[Pipeline, list[float]]:
    return {pipeline: _losses(rank, world_size, pipeline) for pipeline in Pipeline}


def test_sparse_dist_pipeline_matches_plain_loop() -> None:
    # Two ranks: the planner puts one table on each, so every batch's ids cross the all-to-all.
    for losses in run_distributed(_both, 2):
        sparse_dist, plain = losses[Pipeline.SPARSE_DIST], losses[Pipeline.PLAIN]
        assert torch.allclose(torch.tensor(sparse_dist), torch.tensor(plain), atol=1e-6), losses
        # The same ten batches come back: by the third pass the towers have fit them a little.
        assert sum(plain[-CYCLE:]) < sum(plain[:CYCLE]), plain
