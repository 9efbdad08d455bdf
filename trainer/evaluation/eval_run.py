"""``twotower eval --run RUN_DIR``: rebuild the run's model, load its best validation checkpoint
(else its latest), evaluate; the results go to ``eval_<split>_<checkpoint>.json`` in the run
directory (the run's own ``metrics.json`` is left as training wrote it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from config import ConfigError, load_config
from data_pipeline.manifest import Manifest
from trainer.build import build_sharded_model
from trainer.evaluation.evaluate import evaluate_model
from trainer.features import resolve_features
from trainer.runtime.checkpoint import best_checkpoint, latest_checkpoint, load_model
from trainer.runtime.distributed import init_distributed, seed_everything
from trainer.runtime.run_files import CONFIG_FILE, eval_file

logger = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path, split: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Collective over the current process group (any world size: checkpoints reshard)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise ConfigError(f"{config_path}: not a run directory (no config.yaml)")
    config = load_config(config_path, overrides or [])
    env = init_distributed()
    seed_everything(config.seed)
    checkpoint = best_checkpoint(run_dir) or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint to evaluate")
    manifest = Manifest.load(config.data.path)
    features = resolve_features(manifest, config)
    model = build_sharded_model(manifest, config, env, features)
    meta = load_model(checkpoint, model)
    logger.info("evaluating %s (trained for %s steps)", checkpoint, meta.get("step"))
    split = split or config.eval.split
    return evaluate_model(
        model,
        manifest,
        config,
        env,
        run_dir,
        split,
        output_name=eval_file(split, checkpoint.name),
        checkpoint=checkpoint.name,
        features=features,
    )
