"""The peer a user would pick: TorchRec's ``examples/retrieval/two_tower_train.py`` design.

Written here from the example's public description (not copied), on random ids, so that the
trainer's samples/s can be set against what TorchRec's own two-tower recipe reaches on the same
machine. The model:

- one ``EmbeddingBagCollection`` (built on the meta device, materialized by DMP) with two tables,
  ``user_table`` [num_embeddings, D] read by ``user_id`` and ``item_table`` [num_embeddings, D]
  read by ``item_id``, sum pooling, one id per feature per sample;
- a query MLP and a candidate MLP (``torchrec.modules.mlp.MLP``, ``layer_sizes`` e.g. (128, 64),
  ReLU after every layer as in the example), [B, D] -> [B, layer_sizes[-1]];
- ``TwoTowerTrainTask``: logits [B] = (query * candidate).sum(-1), ``BCEWithLogitsLoss`` against
  random 0/1 labels [B].

Training as the example does it: the tables get ``RowWiseAdagrad`` fused into backward
(``apply_optimizer_in_backward``), the dense MLPs Adam in a ``KeyedOptimizerWrapper``, both joined
with ``model.fused_optimizer`` in a ``CombinedOptimizer``; the planner is built from
``Topology(world_size, compute_device=device.type)`` and ``collective_plan``; the model is wrapped
in ``DistributedModelParallel``; batches (``torchrec.datasets.utils.Batch`` from
``RandomRecDataset``, ids uniform in [0, num_embeddings)) are fed through
``TrainPipelineSparseDist``, which on CPU runs with no side streams (``progress`` uses
``torch.cuda.stream(None)``, a no-op, and the CPU device module's ``current_stream``) but still
rewrites the sharded collection's forward and starts the next batch's input_dist (ids all-to-all,
async on gloo) before the current forward, waiting on it after. ``--pipeline plain`` runs the
plain forward/backward/step loop instead. Device and backend come from the environment: CUDA and
NCCL where a GPU is visible, else CPU and gloo.

    python -m bench.peer_torchrec_example --batch-size 1024 4096 --ranks 1 2 --steps 30

launches, for every (batch size, ranks) pair, ``ranks`` processes under torchrun with
``OMP_NUM_THREADS=--threads``; each trains ``--warmup-steps`` untimed steps and then ``--steps``
timed ones. samples/s is ranks * batch * steps over the slowest rank's wall time of the timed
steps, written by rank 0 to a JSON file (``--result-json``, the per-rank entry point) and read back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.random import RandomRecDataset
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.mlp import MLP
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from bench.table import print_table

logger = logging.getLogger(__name__)

MODULE = "bench.peer_torchrec_example"  # the per-rank entry point torchrun runs
QUERY_FEATURE, CANDIDATE_FEATURE = "user_id", "item_id"
LEARNING_RATE = 0.01  # the example's default, for both optimizers
COLUMNS = ["batch", "ranks", "threads", "pipeline", "sharding", "samples/s"]


class Pipeline(Enum):
    """How each rank drives its steps."""

    SPARSE_DIST = "sparse-dist"  # torchrec.distributed.train_pipeline.TrainPipelineSparseDist
    PLAIN = "plain"  # zero_grad, forward, backward, step


class TwoTower(nn.Module):
    """Query and candidate towers over one EmbeddingBagCollection.

    Args:
        embedding_bag_collection: the two tables; each feature pools to [B, D].
        layer_sizes: each MLP's output sizes; the towers emit [B, layer_sizes[-1]].
        device: where the MLPs are built.
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        layer_sizes: Sequence[int],
        device: torch.device,
    ) -> None:
        super().__init__()
        self.ebc = embedding_bag_collection
        embedding_dim = embedding_bag_collection.embedding_bag_configs()[0].embedding_dim
        self.query_proj = MLP(embedding_dim, list(layer_sizes), device=device)
        self.candidate_proj = MLP(embedding_dim, list(layer_sizes), device=device)

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features: ``user_id`` and ``item_id``, jagged [sum(lengths)] each, B samples.
        Returns (query [B, H], candidate [B, H])."""
        pooled = self.ebc(features)
        return self.query_proj(pooled[QUERY_FEATURE]), self.candidate_proj(
            pooled[CANDIDATE_FEATURE]
        )


class TwoTowerTrainTask(nn.Module):
    """Loss of a batch: BCE of the towers' dot product against the labels.

    Returns (loss [], (loss [], logits [B], labels [B])), detached outputs as the pipeline expects.
    """

    def __init__(self, two_tower: TwoTower) -> None:
        super().__init__()
        self.two_tower = two_tower
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        query, candidate = self.two_tower(batch.sparse_features)
        logits = (query * candidate).sum(dim=-1)
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


def build_task(
    num_embeddings: int, embedding_dim: int, layer_sizes: Sequence[int], device: torch.device
) -> TwoTowerTrainTask:
    """The unsharded task: tables on the meta device with RowWiseAdagrad attached for backward."""
    tables = [
        EmbeddingBagConfig(
            name=f"{name}_table",
            embedding_dim=embedding_dim,
            num_embeddings=num_embeddings,
            feature_names=[feature],
        )
        for name, feature in (("user", QUERY_FEATURE), ("item", CANDIDATE_FEATURE))
    ]
    collection = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    task = TwoTowerTrainTask(TwoTower(collection, layer_sizes, device))
    apply_optimizer_in_backward(RowWiseAdagrad, collection.parameters(), {"lr": LEARNING_RATE})
    return task


def shard(
    task: TwoTowerTrainTask, device: torch.device, batch_size: int
) -> tuple[DistributedModelParallel, CombinedOptimizer, str]:
    """DMP over the planner's plan, the combined optimizer, and the plan in words
    (``table: sharding type/kernel@ranks``)."""
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size)
    plan: ShardingPlan = planner.collective_plan(task, get_default_sharders(), dist.group.WORLD)
    model = DistributedModelParallel(module=task, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=LEARNING_RATE),
    )
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])
    sharding = ", ".join(
        f"{table}: {spec.sharding_type}/{spec.compute_kernel}@{_ranks(spec.ranks)}"
        for module_plan in plan.plan.values()
        for table, spec in module_plan.items()  # type: ignore[attr-defined]
    )
    return model, optimizer, sharding


def _ranks(ranks: list[int] | None) -> str:
    return ",".join(map(str, ranks or []))


def random_batches(batch_size: int, num_embeddings: int, seed: int) -> Iterator[Batch]:
    """Endless batches: one id per feature per sample, uniform in [0, num_embeddings), labels
    0/1; ten batches generated up front and cycled, as RandomRecDataset does."""
    dataset = RandomRecDataset(
        keys=[QUERY_FEATURE, CANDIDATE_FEATURE],
        batch_size=batch_size,
        hash_size=num_embeddings,
        ids_per_feature=1,
        num_dense=0,
        manual_seed=seed,
    )
    return iter(dataset)


def step_function(
    pipeline: Pipeline,
    model: DistributedModelParallel,
    optimizer: CombinedOptimizer,
    device: torch.device,
    batches: Iterator[Batch],
) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A callable that trains one step on the next batch and returns the task's detached
    (loss [], logits [B], labels [B]); both pipelines train the same steps in the same order."""
    if pipeline is Pipeline.SPARSE_DIST:
        sparse_dist = TrainPipelineSparseDist(model, optimizer, device)
        return lambda: sparse_dist.progress(batches)

    def plain_step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        optimizer.zero_grad()
        loss, output = model(next(batches).to(device))
        loss.backward()
        optimizer.step()
        return output

    return plain_step


def _device_and_backend() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


@record  # a rank's Python traceback lands in torchrun's summary, the tail run_peer reports
def train_rank(args: argparse.Namespace) -> None:
    """One torchrun rank: build, warm up, time ``args.steps`` steps; rank 0 writes the JSON."""
    torch.set_num_threads(args.threads)
    device, backend = _device_and_backend()
    dist.init_process_group(backend=backend)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        (batch_size,) = args.batch_size
        task = build_task(args.num_embeddings, args.embedding_dim, args.layer_sizes, device)
        model, optimizer, sharding = shard(task, device, batch_size)
        batches = random_batches(batch_size, args.num_embeddings, seed=rank)
        step = step_function(args.pipeline, model, optimizer, device, batches)
        for _ in range(args.warmup_steps):
            step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        slowest = float(elapsed.item())
        if rank == 0:
            result = {
                "samples_per_s": world_size * batch_size * args.steps / slowest,
                "seconds": slowest,
                "pipeline": args.pipeline.value,
                "sharding": sharding,
            }
            Path(args.result_json).write_text(json.dumps(result))
            logger.info("rank 0: %s", result)
        # No rank closes its gloo connections while a peer is still on its last collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class PeerSpec:
    """One peer measurement: ``ranks`` processes, each at ``batch_size`` rows per step."""

    batch_size: int
    ranks: int
    steps: int
    num_embeddings: int = 1_000_000
    embedding_dim: int = 64
    layer_sizes: tuple[int, ...] = (128, 64)
    threads: int = 1
    warmup_steps: int = 20
    pipeline: Pipeline = Pipeline.SPARSE_DIST

    def arguments(self) -> list[str]:
        """The per-rank entry point's flags (``--result-json`` aside)."""
        return [
            f"--batch-size={self.batch_size}",
            f"--steps={self.steps}",
            f"--warmup-steps={self.warmup_steps}",
            f"--num-embeddings={self.num_embeddings}",
            f"--embedding-dim={self.embedding_dim}",
            f"--threads={self.threads}",
            f"--pipeline={self.pipeline.value}",
            "--layer-sizes",
            *map(str, self.layer_sizes),
        ]


def run_peer(spec: PeerSpec) -> dict:
    """Launches the ranks under torchrun; returns rank 0's JSON (samples_per_s, seconds,
    pipeline, sharding). Raises RuntimeError with the ranks' stderr tail if torchrun fails."""
    with tempfile.TemporaryDirectory(prefix="peer_torchrec_") as folder:
        result, log = Path(folder, "result.json"), Path(folder, "stderr.log")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={spec.ranks}",
            "-m",
            MODULE,
            f"--result-json={result}",
            *spec.arguments(),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
        with open(log, "w") as stderr:
            code = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        if code.returncode != 0 or not result.exists():
            raise RuntimeError(
                f"peer at batch {spec.batch_size}, {spec.ranks} rank(s) exited "
                f"{code.returncode}:\n{log.read_text()[-3000:]}"
            )
        return json.loads(result.read_text())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=_positive, nargs="+", default=[4096])
    parser.add_argument("--ranks", type=_positive, nargs="+", default=[1])
    parser.add_argument("--steps", type=_positive, default=50, help="timed steps per rank")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed steps first")
    parser.add_argument("--num-embeddings", type=_positive, default=1_000_000, help="rows/table")
    parser.add_argument("--embedding-dim", type=_positive, default=64)
    parser.add_argument("--layer-sizes", type=_positive, nargs="+", default=[128, 64])
    parser.add_argument("--threads", type=_positive, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument(
        "--pipeline", type=Pipeline, choices=list(Pipeline), default=Pipeline.SPARSE_DIST
    )
    parser.add_argument("--result-json", help="run as one torchrun rank; rank 0 writes here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.result_json else logging.WARNING)
    if args.result_json:
        if len(args.batch_size) != 1:
            raise SystemExit("--result-json: one --batch-size per torchrun launch")
        train_rank(args)
        return
    rows = []
    for ranks in args.ranks:
        for batch_size in args.batch_size:
            spec = PeerSpec(
                batch_size,
                ranks,
                args.steps,
                args.num_embeddings,
                args.embedding_dim,
                tuple(args.layer_sizes),
                args.threads,
                args.warmup_steps,
                args.pipeline,
            )
            result = run_peer(spec)
            rows.append(
                {
                    "batch": batch_size,
                    "ranks": ranks,
                    "threads": args.threads,
                    "pipeline": result["pipeline"],
                    "sharding": result["sharding"],
                    "samples/s": result["samples_per_s"],
                }
            )
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
