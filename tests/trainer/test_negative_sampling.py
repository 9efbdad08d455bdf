"""Negative sources wired into training: every source and family trains, masking holds, the
estimator stays synchronized over ranks, and unsupported combinations fail at start."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from data_pipeline.manifest import Manifest
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from trainer.build import build_sharded_model, loader_spec
from trainer.config import ConfigError, load_config
from trainer.distributed import init_distributed
from trainer.negative_sampling import NegativeSampling, check_supported, step_generator
from trainer.train import train

TINY = [
    "model.embedding_dim=8",
    "model.user_mlp=[16]",
    "model.item_mlp=[16]",
    "model.output_dim=8",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "data.num_workers=0",
    "train.epochs=1",
    "train.log_every_steps=5",
    "train.progress_bar=false",
    "logging.wandb=false",
]

VARIANTS = {
    "log_q": ["negatives.log_q.enabled=true", "negatives.log_q.hash_size=256"],
    "mixed_uniform": ["negatives.mixed.num_samples=16", "negatives.mixed.distribution=uniform"],
    "mixed_unigram_log_q": ["negatives.mixed.num_samples=16", "negatives.log_q.enabled=true"],
    "memory": [
        "negatives.memory.size=64",
        "negatives.memory.warmup_steps=2",
        "negatives.memory.max_staleness_steps=4",
    ],
    "impressions": ["negatives.impressions.per_row=2", "negatives.impressions.weight=2.0"],
    "mined": [
        "negatives.mined.per_row=2",
        "negatives.mined.top_k=12",
        "negatives.mined.skip_top=3",
        "negatives.mined.refresh_every_steps=4",
    ],
    "sampled_softmax": ["loss.family=sampled_softmax", "loss.negatives_per_row=5"],
    "sigmoid": ["loss.family=sigmoid", "loss.negatives_per_row=4"],
    "cosine": ["loss.family=cosine", "loss.negatives_per_row=3"],
    "triplet": ["loss.family=triplet", "loss.margin=0.3"],
    "bpr_learned_temperature": ["loss.family=bpr", "model.learn_temperature=true"],
}


def _train_variants(rank: int, world_size: int, root: str, out: str) -> dict[str, float]:
    losses = {}
    for name, overrides in VARIANTS.items():
        config = load_config(
            None, [*TINY, f"data.path={root}", f"run.dir={out}/{name}", *overrides]
        )
        result = train(config)
        assert result.steps == 20, (name, result)
        losses[name] = result.final_loss
    return losses


def test_every_source_and_family_trains(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", impressions=True)
    (losses,) = run_distributed(_train_variants, 1, str(root), str(tmp_path / "runs"))
    assert set(losses) == set(VARIANTS)
    assert all(math.isfinite(v) for v in losses.values()), losses
    for name in VARIANTS:
        assert (tmp_path / "runs" / name / "metrics.json").exists()
        assert (tmp_path / "runs" / name / "train_summary.json").exists()
    # The frequency estimator is checkpointed with the model.
    checkpoint = tmp_path / "runs" / "log_q" / "checkpoints" / "step-20"
    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert "samplers.frequency_estimator.interval" in keys
    assert not any(
        k.startswith("samplers")
        for k in FileSystemReader(str(tmp_path / "runs" / "memory" / "checkpoints" / "step-20"))
        .read_metadata()
        .state_dict_metadata
    )


ALL_ON = [
    "loss.global_negatives=true",
    "negatives.log_q.enabled=true",
    "negatives.log_q.hash_size=256",
    "negatives.mixed.num_samples=16",
    "negatives.memory.size=64",
    "negatives.memory.warmup_steps=1",
    "negatives.impressions.per_row=2",
    "negatives.mined.per_row=2",
    "negatives.mined.top_k=12",
    "negatives.mined.refresh_every_steps=3",
]


def _score_rank(rank: int, world_size: int, root: str, mask: bool) -> dict[str, torch.Tensor]:
    """A few steps with every source on; returns what the masks and the estimator saw."""
    env = init_distributed()
    config = load_config(
        None,
        [
            *TINY,
            f"data.path={root}",
            *ALL_ON,
            "negatives.mixed.num_samples=200",
            f"loss.mask_accidental_hits={mask}",
        ],
    )
    manifest = Manifest.load(root)
    torch.manual_seed(0)
    model = build_sharded_model(manifest, config, env)
    negatives = NegativeSampling.build(config, manifest, env)
    from data_pipeline.loader import build_event_loader

    loader = build_event_loader(
        loader_spec(config, "train", True, manifest), manifest, rank, world_size
    )
    hits = 0
    live = 0
    for step, batch in enumerate(loader):
        if step == 4:
            break
        generator = step_generator(config.seed, rank, step, env.device)
        extra = negatives.plan(model, batch, step, generator, manifest)
        outputs = model(batch.user_features, batch.item_features, negatives.features(extra))
        negatives.observe(batch, step)
        scored, in_batch = negatives.score(outputs, batch, extra, step)
        assert scored.ids is not None
        counted = scored.weights > 0
        hits += int((counted & (scored.ids == batch.item_ids.unsqueeze(1))).sum())
        live += int(counted.sum())
        negatives.remember(in_batch, step)
    assert negatives.estimator is not None
    return {
        "hits": torch.tensor(hits),
        "live": torch.tensor(live),
        **negatives.estimator.state_dict(),
    }


def test_no_negative_equals_the_positive_and_ranks_agree(tmp_path: Path) -> None:
    """200 corpus samples over 60 items collide with positives constantly: none may count."""
    root = write_tiny_dataset(tmp_path / "data", impressions=True)
    results = run_distributed(_score_rank, 2, str(root), True)
    for result in results:
        assert int(result["hits"]) == 0 and int(result["live"]) > 0
    # The check can fail: without masking, sampled copies of the positive do count.
    unmasked = run_distributed(_score_rank, 1, str(root), False)
    assert int(unmasked[0]["hits"]) > 0
    for key, value in results[0].items():
        if key not in ("hits", "live"):
            assert torch.equal(value, results[1][key]), key


def test_impression_negatives_on_data_without_impressions_fail_naming_keys(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    config = load_config(None, [f"data.path={root}", "negatives.impressions.per_row=2"])
    with pytest.raises(
        ConfigError, match=r"negatives\.impressions\.per_row.*impression_negative_ids"
    ):
        check_supported(config, manifest)
    config = load_config(
        None, [f"data.path={root}", "negatives.mined.per_row=2", "negatives.mined.top_k=500"]
    )
    with pytest.raises(ConfigError, match=r"negatives\.mined\.top_k"):
        check_supported(config, manifest)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss.family=cosine"], "loss.negatives_per_row"),
        (["loss.family=softmax", "loss.negatives_per_row=3"], "loss.negatives_per_row"),
        (["negatives.mined.per_row=2", "negatives.mined.skip_top=100"], "negatives.mined.top_k"),
        (["negatives.mined.per_row=50", "negatives.mined.top_k=20"], "negatives.mined.per_row"),
        (["negatives.memory.size=8", "negatives.memory.max_staleness_steps=0"], "negatives.memory"),
        (["model.learn_temperature=true", "model.temperature=5.0"], "model.temperature"),
        (["negatives.log_q.alpha=0"], "negatives.log_q.alpha"),
        (["negatives.impressions.weight=0"], "negatives.impressions.weight"),
    ],
)
def test_bad_combinations_name_their_keys(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)
