"""Where a training step's time goes: the TorchRec two-tower and the plain-PyTorch baseline
under ``torch.profiler``.

    python -m bench.train --data data/synthetic --profile             # 1 rank
    torchrun --standalone --nproc_per_node 2 -m bench.train --data data/synthetic --profile

Batches are read before profiling, so the tables show the step only (the loader is measured by
``bench.reader``). Each implementation prints its step time and its top operators by self CPU
time.
"""

from __future__ import annotations

import time
from itertools import islice

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from bench.plain_two_tower import build_plain_model, step_context
from bench.runs import run_overrides
from config import ExperimentConfig, load_config
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from trainer.build import build_dense_optimizer, build_sharded_model, label_weights, loader_spec
from trainer.distillation import Distillation
from trainer.negatives.negative_sampling import NegativeSampling
from trainer.runtime.distributed import DistributedEnv, init_distributed, seed_everything, shutdown
from trainer.step import StepContext, train_step

WARMUP_STEPS = 10


def _torchrec(
    manifest: Manifest, config: ExperimentConfig, env: DistributedEnv
) -> tuple[torch.nn.Module, StepContext]:
    model = build_sharded_model(manifest, config, env)
    context = StepContext(
        build_dense_optimizer(model, config),
        label_weights(manifest, config),
        NegativeSampling.build(config, manifest, env),
        manifest,
        config,
        env,
        distillation=Distillation.build(config, manifest, env),
    )
    return model, context


def _plain(
    manifest: Manifest, config: ExperimentConfig, env: DistributedEnv
) -> tuple[torch.nn.Module, StepContext]:
    model = DistributedDataParallel(build_plain_model(manifest, config))
    return model, step_context(model, manifest, config, env)


def _plain_dense(
    manifest: Manifest, config: ExperimentConfig, env: DistributedEnv
) -> tuple[torch.nn.Module, StepContext]:
    model = DistributedDataParallel(build_plain_model(manifest, config, sparse_gradients=False))
    return model, step_context(model, manifest, config, env)


BUILDERS = {
    "torchrec": _torchrec,
    "plain pytorch": _plain,
    "plain pytorch, dense table gradients": _plain_dense,
}


def _quiet(*_: object) -> None:
    return None


def profile(
    config_path: str,
    data: str,
    steps: int,
    extra: list[str],
    top: int,
    names: tuple[str, ...] = tuple(BUILDERS),
) -> None:
    """Prints ms/step of each implementation in ``names`` over ``steps`` steps, timed step by
    step in alternation (so background load hits both alike), then each one's top ``top``
    operators by self CPU time over the same steps under the profiler."""
    env = init_distributed()
    try:
        config = load_config(config_path, run_overrides(data, "runs/profile", steps, extra))
        manifest = Manifest.load(data)
        loader = build_event_loader(
            loader_spec(config, config.data.train_split, True, manifest),
            manifest,
            env.rank,
            env.world_size,
        )
        batches = list(islice(iter(loader), WARMUP_STEPS + steps))
        runs = {}
        for name in names:
            seed_everything(config.seed)
            runs[name] = BUILDERS[name](manifest, config, env)
        for step, batch in enumerate(batches[:WARMUP_STEPS]):
            for model, context in runs.values():
                train_step(model, batch, step, context)
        seconds = dict.fromkeys(runs, 0.0)
        for step, batch in enumerate(batches[WARMUP_STEPS:], start=WARMUP_STEPS):
            for name, (model, context) in runs.items():
                start = time.perf_counter()
                train_step(model, batch, step, context)
                seconds[name] += time.perf_counter() - start
        rows = sum(b.size for b in batches[WARMUP_STEPS:]) * env.world_size
        report = print if env.is_main else _quiet
        report(f"## {steps} steps, {env.world_size} rank(s), alternating between models")
        for name, total in seconds.items():
            report(f"{name}: {1000 * total / steps:.1f} ms/step, {rows / total:,.0f} samples/s")
        for name, (model, context) in runs.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
                for step, batch in enumerate(batches[WARMUP_STEPS:], start=WARMUP_STEPS):
                    train_step(model, batch, step, context)
            report(f"\n## {name}: top {top} operators by self CPU time (rank 0)")
            report(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    finally:
        shutdown()
