"""Sequence mode (``model.history.packed``): windows of each user's newest events, checked
against brute force over the prepared rows; one causal pass equal to the per-row encoder at
every position; the loader resumes; 2 gloo ranks train it with the whole-corpus softmax."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from config import ConfigError, load_config
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.split_table import read_split_columns
from tests.dist_helpers import run_distributed
from tests.trainer.test_events_training import prepared_example_log
from tests.trainer.test_train import _train_rank
from trainer.build import batch_builder, build_unsharded_model, loader_spec

STORED_HISTORY = 12
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "events.yaml"
PACKED = [
    "features.groups=[id,history,categorical,text]",
    "data.recent_history=0",
    "data.num_workers=0",
    "data.shuffle=false",
    "data.batch_size=8",
    "model.embedding_dim=16",
    "model.user_mlp=[32]",
    "model.item_mlp=[32]",
    "model.output_dim=16",
    "model.history.enabled=true",
    "model.history.recency_buckets=0",
    "model.history.causal=true",
    "model.history.positions=relative",
    "model.history.summary=newest",
    "model.history.packed=true",
    "loss.label_weights={click: 1.0, purchase: 2.0}",
    "train.progress_bar=false",
    "logging.wandb=false",
]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small own log prepared by the real converter, histories cut at STORED_HISTORY."""
    root = tmp_path_factory.mktemp("shop")
    flags = ("--history-length", str(STORED_HISTORY))
    return prepared_example_log(root, *flags, shoppers=120, products=40, events=1500)


def _config(data: Path, *extra: str):
    length = f"model.history.max_length={STORED_HISTORY}"
    return load_config(str(CONFIG), [f"data.path={data}", *PACKED, length, *extra])


def _windows(data: Path, max_length: int) -> list:
    config = _config(data, f"model.history.max_length={max_length}")
    manifest = Manifest.load(data)
    spec = loader_spec(config, "train", True, manifest)
    return list(build_event_loader(spec, manifest, 0, 1))


def _train_events(data: Path) -> tuple[pa.Table, dict[int, list[int]]]:
    """Every train row, and each user's rows in history order (timestamp, item)."""
    manifest = Manifest.load(data)
    table = read_split_columns(
        str(data), manifest, "train", manifest.schema.event_arrow_schema().names
    )
    user, ts, item = (table.column(c).to_numpy() for c in ("user_id", "timestamp", "item_id"))
    by_user: dict[int, list[int]] = defaultdict(list)
    for row in np.lexsort((item, ts, user)):
        by_user[int(user[row])].append(int(row))
    return table, by_user


@pytest.mark.parametrize("max_length", [STORED_HISTORY, 5])
def test_windows_are_each_users_newest_events_with_their_own_labels(
    shop: Path, max_length: int
) -> None:
    table, by_user = _train_events(shop)
    ts, item = table.column("timestamp").to_numpy(), table.column("item_id").to_numpy()
    labels = np.stack([table.column(f"label_{x}").to_numpy() for x in ("click", "purchase")], 1)
    seen: set[int] = set()
    for batch in _windows(shop, max_length):
        counts = batch.window_targets.tolist()
        window_users = batch.user_features["user_id"].values().tolist()
        start = 0
        for user, count in zip(window_users, counts):
            assert user not in seen  # one window per user
            seen.add(user)
            rows = by_user[user][::-1]  # newest first
            expected = rows[: min(len(rows) - 1, STORED_HISTORY, max_length)]
            got = slice(start, start + count)
            assert count == len(expected)
            assert batch.user_ids[got].tolist() == [user] * count
            assert batch.item_ids[got].tolist() == item[expected].tolist()
            assert batch.timestamp[got].tolist() == ts[expected].tolist()
            # The label rule (history actions, else 1) against each event's own logged labels.
            np.testing.assert_array_equal(batch.labels[got].numpy(), labels[expected])
            start += count
        assert start == batch.size
    assert seen == {u for u, rows in by_user.items() if len(rows) > 1}
    assert any(len(r) - 1 > max_length for r in by_user.values())  # some windows are cut
    assert any(
        not labels[r].any() for rows in by_user.values() for r in rows[1:]
    )  # weight-0 targets


def test_one_causal_pass_equals_the_per_row_model_at_every_position(shop: Path) -> None:
    """Every position of untruncated windows: the packed user (and item) vector equals the
    per-row model's on that event's own logged row."""
    config = _config(shop, f"model.history.max_length={STORED_HISTORY}")
    manifest = Manifest.load(shop)
    torch.manual_seed(0)
    model = build_unsharded_model(manifest, config).eval()
    with torch.no_grad():
        model.history.encoder.relative_bias.normal_(std=0.5)
    table, by_user = _train_events(shop)
    key = {
        (int(u), int(t), int(i)): r
        for r, (u, t, i) in enumerate(
            zip(*(table.column(c).to_numpy() for c in ("user_id", "timestamp", "item_id")))
        )
    }
    build = batch_builder(manifest, config)
    compared = 0
    for batch in _windows(shop, STORED_HISTORY):
        with torch.no_grad():
            packed = model(
                batch.user_features, batch.item_features, None, None, batch.window_targets
            )
        lengths = batch.user_features["hist_item_ids"].lengths()
        keep = torch.repeat_interleave(lengths < STORED_HISTORY, batch.window_targets)
        rows = [
            key[(int(u), int(t), int(i))]
            for u, t, i in zip(batch.user_ids[keep], batch.timestamp[keep], batch.item_ids[keep])
        ]
        if not rows:
            continue
        per_row = build(table.take(rows))
        with torch.no_grad():
            reference = model(per_row.user_features, per_row.item_features)
        torch.testing.assert_close(packed.user[keep], reference.user, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(packed.item[keep], reference.item, atol=3e-5, rtol=1e-4)
        compared += len(rows)
    assert compared > 100


def test_window_batches_travel_from_loader_workers(shop: Path) -> None:
    """A worker hands a window batch over by pickling: every field, window counts included."""
    (batch, *_) = _windows(shop, 5)
    copy = pickle.loads(pickle.dumps(batch))
    assert torch.equal(copy.window_targets, batch.window_targets)
    assert copy.user_features.stride() == batch.window_targets.shape[0]
    assert copy.item_features.stride() == batch.size == int(batch.window_targets.sum())
    assert torch.equal(copy.labels, batch.labels) and torch.equal(copy.item_ids, batch.item_ids)


def test_sequence_loader_resumes_where_it_stopped(shop: Path) -> None:
    config = _config(shop, "data.shuffle=true", "data.batch_size=4")
    manifest = Manifest.load(shop)
    spec = loader_spec(config, "train", True, manifest)
    whole = [b.item_ids for b in build_event_loader(spec, manifest, 0, 1)]
    loader = build_event_loader(spec, manifest, 0, 1)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    resumed = build_event_loader(spec, manifest, 0, 1)
    resumed.load_state_dict(state)
    rest = [b.item_ids for b in resumed]
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.history.causal=false"], "model.history.causal"),
        (["model.history.positions=learned"], "model.history.positions"),
        (["model.history.summary=newest_and_mean"], "model.history.summary"),
        (["model.history.recency_buckets=4"], "model.history.recency_buckets"),
        (["negatives.impressions.per_row=2"], "negatives.impressions.per_row"),
        (["loss.candidates=corpus", "negatives.log_q.enabled=true"], "negatives.log_q.enabled"),
        (
            ["loss.candidates=corpus", "negatives.mixed.num_samples=8"],
            "negatives.mixed.num_samples",
        ),
    ],
)
def test_sequence_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(CONFIG), [*PACKED, "negatives.log_q.enabled=false", *overrides])


def test_data_that_cannot_fill_the_windows_is_refused(shop: Path) -> None:
    manifest = Manifest.load(shop)
    longer = _config(shop, f"model.history.max_length={STORED_HISTORY + 1}")
    with pytest.raises(ConfigError, match="--history-length 13"):
        loader_spec(longer, "train", True, manifest)
    context = _config(shop, "features.groups=[id,history,context]")
    with pytest.raises(ConfigError, match="features.groups"):
        loader_spec(context, "train", True, manifest)


@pytest.mark.slow
def test_two_ranks_train_windows_on_the_whole_corpus_softmax(tmp_path: Path) -> None:
    """The example shop log, 2 gloo ranks, every position against every item: beyond the
    interval of most-popular on the held-out events."""
    data = prepared_example_log(tmp_path)
    overrides = [
        *PACKED,
        f"data.path={data}",
        f"run.dir={tmp_path / 'run'}",
        "data.batch_size=16",
        "model.embedding_dim=64",
        "model.user_mlp=[128]",
        "model.item_mlp=[128]",
        "model.output_dim=64",
        "loss.candidates=corpus",
        "negatives.log_q.enabled=false",
        "train.epochs=6",
    ]
    results = run_distributed(_train_rank, 2, overrides, str(CONFIG), timeout_s=600)
    assert results[0]["rows"] > 600 * 20  # positions, not windows: ~37 per shopper and epoch
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_queries"] == 600
    for name in ("hr@10", "ndcg@10"):
        low = metrics["intervals"]["model"][name][0]
        assert low > metrics["popularity"][name], (name, metrics["model"], metrics["popularity"])
