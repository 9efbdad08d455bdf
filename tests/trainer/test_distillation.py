"""Distillation from the ranker inside retrieval training: the teacher's candidate scores match
``Ranker.score_items``, the teacher never gets a gradient, the listwise term moves retrieval's
ranking toward the teacher's, sharded and unsharded runs agree, and config mistakes name keys."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from config import ConfigError, ExperimentConfig, load_config, to_yaml
from data_pipeline.item_store import ItemFeatureStore
from data_pipeline.manifest import Manifest
from data_pipeline.reader import list_work_units, read_unit
from models.ranker import Ranker, expected_net_user_value
from models.two_tower import select_keys
from tests.dist_helpers import run_distributed
from tests.models.test_distillation import _kendall_tau
from tests.tiny_dataset import write_tiny_dataset
from tests.trainer.test_sharded_vs_unsharded import copy_state_dict
from trainer.build import batch_builder, build_sharded_model, build_unsharded_model
from trainer.distillation import Distillation, row_candidates, teacher_value_weights
from trainer.negatives.negative_sampling import NegativeSampling
from trainer.ranker_build import build_unsharded_ranker
from trainer.runtime.distributed import DistributedEnv, seed_everything
from trainer.runtime.run_logger import read_metrics

SMALL = [
    "model.embedding_dim=16",
    "model.user_mlp=[32]",
    "model.item_mlp=[32]",
    "model.output_dim=8",
    "ranker.embedding_dim=8",
    "ranker.mlp=[16]",
    "ranker.low_rank=4",
    "ranker.cross_layers=1",
    "data.num_workers=0",
    "train.progress_bar=false",
    "ranker.train.progress_bar=false",
    "logging.wandb=false",
    "loss.label_weights={click: 1.0, like: 1.0}",
]
CPU = DistributedEnv(0, 1, 0, torch.device("cpu"), "gloo")


def _config(root: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"data.path={root}", *SMALL, *extra])


def _batch(root: Path, config: ExperimentConfig, rows: slice = slice(0, 32)):
    manifest = Manifest.load(root)
    units = list_work_units(manifest.split_paths(root, "train"))
    table = read_unit(units[0], None).slice(rows.start, rows.stop - rows.start)
    return batch_builder(manifest, config)(table)


def _distillation(root: Path, config: ExperimentConfig, seed: int = 1) -> Distillation:
    """Listwise distillation from a randomly initialized (seeded) frozen ranker."""
    manifest = Manifest.load(root)
    torch.manual_seed(seed)
    teacher = build_unsharded_ranker(manifest, config).freeze()
    return Distillation(
        config.distillation,
        teacher,
        ItemFeatureStore.load(root, manifest),
        teacher_value_weights(config, manifest),
    )


LISTWISE = ["distillation.listwise.enabled=true", "distillation.listwise.teacher=unused"]


def test_teacher_logits_match_score_items(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    config = _config(root, "data.recent_history=2", *LISTWISE)
    distillation = _distillation(root, config)
    batch = _batch(root, config, slice(0, 5))
    ids = torch.tensor([[3, 7, 3, -1], [0, 59, 12, 7], [1, 2, 3, 4], [5, 5, 5, 5], [9, 8, 7, 6]])
    mask = ids >= 0
    mask[2] = False  # rows without candidates are fine
    logits = distillation.teacher_logits(batch.user_features, ids, mask)
    teacher = distillation.teacher
    assert isinstance(teacher, Ranker) and distillation.store is not None
    assert distillation.value_weights is not None
    users = select_keys(batch.user_features, teacher.user_feature_names)
    grid = teacher.score_items(users, distillation.store.lookup(ids.clamp_min(0).reshape(-1)))
    values = expected_net_user_value(grid, distillation.value_weights).view(5, 5, 4)
    expected = values[torch.arange(5), torch.arange(5)].log()  # user b with its own row
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert torch.all(logits[~mask] == 0)


def _scored(model, negatives: NegativeSampling, batch):
    outputs = model(batch.user_features, batch.item_features)
    scored, _ = negatives.score(outputs, batch, None, 0)
    return scored, outputs.temperature


def test_teacher_gets_no_gradient_and_the_student_does(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    config = _config(root, *LISTWISE, "distillation.listwise.negatives_per_row=5")
    manifest = Manifest.load(root)
    model = build_unsharded_model(manifest, config)
    distillation = _distillation(root, config)
    batch = _batch(root, config)
    scored, temperature = _scored(model, NegativeSampling.build(config, manifest, CPU), batch)
    candidates = row_candidates(batch, scored, 5, torch.Generator().manual_seed(0))
    assert candidates.scores.shape == (32, 6) and int(candidates.mask.sum(dim=1).max()) <= 6
    loss = distillation.loss(
        batch, scored.positive, scored, temperature, torch.Generator().manual_seed(0)
    )
    assert float(loss) > 0
    loss.backward()
    assert distillation.teacher is not None
    for parameter in distillation.teacher.parameters():
        assert not parameter.requires_grad and parameter.grad is None
    assert all(p.grad is not None for p in model.user_tower.parameters())


def test_listwise_moves_retrieval_ranking_toward_the_teacher(tmp_path: Path) -> None:
    """Retrieval trained by the listwise term alone ranks its in-batch candidates more like
    the teacher does (Kendall tau over each row's candidates, on a held-out batch)."""
    root = write_tiny_dataset(tmp_path / "data")
    config = _config(root, *LISTWISE, "distillation.listwise.teacher_temperature=0.1")
    manifest = Manifest.load(root)
    torch.manual_seed(0)
    model = build_unsharded_model(manifest, config)
    distillation = _distillation(root, config)
    negatives = NegativeSampling.build(config, manifest, CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    held_out = _batch(root, config, slice(32, 64))

    def agreement() -> float:
        with torch.no_grad():
            scored, _ = _scored(model, negatives, held_out)
        candidates = row_candidates(held_out, scored)
        ids = held_out.item_ids.unsqueeze(0).expand(32, 32)  # every row vs every batch item
        teacher = distillation.teacher_logits(
            held_out.user_features, ids, torch.ones_like(ids, dtype=torch.bool)
        )
        return _kendall_tau(candidates.scores[:, 1:], teacher)

    before = agreement()
    batch = _batch(root, config, slice(0, 32))
    for _ in range(40):
        optimizer.zero_grad()
        scored, temperature = _scored(model, negatives, batch)
        distillation.loss(batch, scored.positive, scored, temperature).backward()
        optimizer.step()
    after = agreement()
    assert after > before + 0.2, (before, after)


def test_pointwise_needs_a_ranker_score_column(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    config = _config(root, "distillation.pointwise.enabled=true")
    with pytest.raises(ConfigError, match=r"'distillation\.pointwise\.enabled'.*manifest\.json"):
        Distillation.build(config, Manifest.load(root), CPU)
    assert Distillation.build(_config(root), Manifest.load(root), CPU) is None


def test_unknown_label_and_teacher_feature_mismatch_name_their_keys(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    bad_label = _config(root, *LISTWISE, "distillation.listwise.label=purchase")
    with pytest.raises(ConfigError, match=r"'distillation\.listwise\.label'.*click"):
        Distillation.build(bad_label, manifest, CPU)
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "config.yaml").write_text(to_yaml(_config(root, "data.recent_history=3")))
    config = _config(
        root,
        "distillation.listwise.enabled=true",
        f"distillation.listwise.teacher={teacher_dir}",
        "data.recent_history=0",
    )
    with pytest.raises(ConfigError, match=r"'data\.recent_history'.*recent_history=3"):
        Distillation.build(config, manifest, CPU)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("distillation.listwise.enabled=true", "distillation.listwise.teacher"),
        ("distillation.listwise.weight=-1", "distillation.listwise.weight"),
        ("distillation.pointwise.weight=-0.5", "distillation.pointwise.weight"),
        (
            "distillation.listwise.teacher_temperature=0",
            "distillation.listwise.teacher_temperature",
        ),
        ("distillation.listwise.negatives_per_row=0", "distillation.listwise.negatives_per_row"),
        ("distillation.pointwise.enabeld=true", "distillation.pointwise.enabeld"),
    ],
)
def test_bad_distillation_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def _sharded_rank(rank: int, world_size: int, root: str) -> dict:
    """Sharded retrieval model vs. an unsharded copy: the same distillation loss and the same
    gradients of the user tower on this rank's half of the batch."""
    root_path = Path(root)
    manifest = Manifest.load(root_path)
    config = _config(root_path, *LISTWISE, "sharding.sharding_types=[table_wise]")
    env = DistributedEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    seed_everything(0)
    reference = build_unsharded_model(manifest, config)
    sharded = build_sharded_model(manifest, config, env)
    copy_state_dict(sharded.state_dict(), reference.state_dict())
    distillation = _distillation(root_path, config)
    negatives = NegativeSampling.build(config, manifest, env)
    batch = _batch(root_path, config, slice(rank * 16, rank * 16 + 16))
    losses = []
    for model in (sharded, reference):
        scored, temperature = _scored(model, negatives, batch)
        losses.append(distillation.loss(batch, scored.positive, scored, temperature))
    return {"sharded": float(losses[0]), "reference": float(losses[1])}


@pytest.mark.slow
def test_sharded_and_unsharded_distillation_agree(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    results = run_distributed(_sharded_rank, 2, str(root))
    for result in results:
        assert result["sharded"] == pytest.approx(result["reference"], abs=1e-5), result
    assert results[0]["sharded"] != results[1]["sharded"]  # each rank its own half


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> float:
    from trainer.train import train

    return train(load_config(None, overrides)).final_loss


def _losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


@pytest.mark.slow
def test_two_rank_training_with_a_trained_teacher_is_deterministic(tmp_path: Path) -> None:
    from trainer.ranker_train import train_ranker
    from trainer.runtime.distributed import shutdown

    root = write_tiny_dataset(tmp_path / "data")
    teacher = tmp_path / "teacher"
    ranker = [
        f"run.dir={teacher}",
        "ranker.train.max_steps=4",
        "eval.at_end=false",
        "data.batch_size=32",
    ]
    try:
        train_ranker(_config(root, *ranker))
    finally:
        shutdown()
    common = [
        f"data.path={root}",
        *SMALL,
        "data.batch_size=32",
        "train.max_steps=6",
        "train.log_every_steps=1",
        "eval.at_end=false",
        "distillation.listwise.enabled=true",
        f"distillation.listwise.teacher={teacher}",
        "distillation.listwise.negatives_per_row=8",
    ]
    runs = []
    for name in ("a", "b", "base"):
        extra = ["distillation.listwise.enabled=false"] if name == "base" else []
        run_distributed(_train_rank, 2, [*common, f"run.dir={tmp_path / name}", *extra])
        runs.append(_losses(tmp_path / name))
    assert len(runs[0]) == 6 and runs[0] == runs[1]
    assert runs[0] != runs[2]  # the teacher term changes the loss


def test_student_reads_fewer_features_than_its_teacher(tmp_path: Path) -> None:
    """The ranker trains on every user feature (context, search tokens, affinities); a student
    configured with ids, history and categories only still distils from it: the training loader
    reads the union, the student's model selects its own keys."""
    from trainer.build import loader_spec, model_schema, with_teacher_user_features
    from trainer.features import resolve_features
    from trainer.ranker_train import train_ranker
    from trainer.runtime.distributed import shutdown
    from trainer.train import train

    root = write_tiny_dataset(tmp_path / "data", all_kinds=True)
    teacher = tmp_path / "teacher"
    ranker = [
        f"run.dir={teacher}",
        "ranker.train.max_steps=4",
        "eval.at_end=false",
        "data.batch_size=32",
    ]
    student = [
        "features.groups=[id,history,categorical]",
        "data.batch_size=32",
        "train.max_steps=4",
        "train.log_every_steps=1",
        "eval.at_end=false",
        "distillation.listwise.enabled=true",
        f"distillation.listwise.teacher={teacher}",
        "distillation.listwise.negatives_per_row=8",
    ]
    try:
        train_ranker(_config(root, *ranker))
        config = _config(root, *student, f"run.dir={tmp_path / 'student'}")
        manifest = Manifest.load(root)
        features = resolve_features(manifest, config)
        union = with_teacher_user_features(features, manifest)
        read = {f.name for f in loader_spec(config, "train", True, manifest, union).schema.features}
        default = {f.name for f in loader_spec(config, "test", False, manifest).schema.features}
        teacher_users = {f.name for f in manifest.schema.user_features()}
        own = {f.name for f in model_schema(manifest, config).features}
        # The job asks its training loader for the union; other loaders read the model's own.
        assert teacher_users <= read and not teacher_users <= own
        assert not teacher_users <= default
        result = train(config)  # stops on a batch lacking the teacher's features otherwise
    finally:
        shutdown()
    assert result.steps == 4 and math.isfinite(result.final_loss)
    assert len(_losses(tmp_path / "student")) == 4
