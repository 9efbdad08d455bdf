"""A synthetic logged feed with known ground truth, written while it is generated.

**World** (:mod:`data_pipeline.datasets.synthetic_world`): user and item latent factors, Zipf-like
item popularity, item bias, and categorical features correlated with the factors.

**Feed.** Sessions follow each other every ``session_interval_s`` seconds; a session picks a user
(Zipf-like activity), samples K candidates by item popularity, and the logged ranker orders them by
``ranker_score = relevance + noise`` (``relevance = u · v + item_bias``); the top P are shown at
positions ``0 .. P-1``. Optionally (``WorldConfig.promotion_std``, ``shuffled_fraction``) the
ordering key also adds a per-item promotion boost unrelated to relevance, and a share of sessions
show their top P in random order; ``ranker_score`` is logged without the boost. A shown item is examined with probability ``1 / (1 + position)^0.7`` and
clicked with probability ``examination × sigmoid(relevance)``. Every impression is a row:
``label_click`` is 0 for the ones not clicked; ``label_like`` and ``label_long_view`` can only be 1
on clicks. All impressions of a session share its timestamp.

**Impression negatives.** ``impression_negative_ids`` lists, for every row, the other items of
the same session (same user, same request, shown together) whose labels are all 0, by position:
hard negatives that are point-in-time by construction, since they come from one request only
(rows are built in :mod:`~data_pipeline.datasets.synthetic_rows`).

**History.** ``hist_item_ids`` holds the items the user clicked in earlier sessions (strictly
before the row's timestamp), newest first (within a session, the lower slot counts as older),
at most H, with aligned ``hist_like`` and ``hist_long_view``. Impressions of one session share the
history the user had when the session was served, so a row never sees its own or a sibling click.
Per-user rolling state (``[users, H]`` arrays) carries histories from chunk to chunk, so memory
is bounded by users and the chunk size, not by the number of events.

**Split** (by time, over session indices; ``twotower prepare synthetic --split temporal``, its
only protocol, with ``--valid-quantile q1 --test-quantile q2`` meaning ``valid_fraction = q2 - q1``
and ``test_fraction = 1 - q2``, :func:`~data_pipeline.datasets.split.session_fractions`): the
first ``1 - valid_fraction - test_fraction`` of sessions go to ``train`` with every impression
(clicked or not: the trainer and the ranking-stage alignment need the negatives). The next ``valid_fraction`` go to ``valid`` and the last
``test_fraction`` to ``test``, keeping **only clicked impressions**: eval rows are positives, so
retrieval metrics (recall@K of the clicked item) can be computed on every eval row.
Non-clicked eval impressions are counted in the manifest and dropped.
``manifest.extra["split"]`` records it in MovieLens' temporal vocabulary: the session-time
quantiles and ``T1``, ``T2`` (first valid and first test session's timestamp), so train rows are
``< T1 <=`` valid rows ``< T2 <=`` test rows, and every clicked eval impression is a query.

**Determinism.** The world draws from ``default_rng([seed, 1])`` and chunk ``c`` from
``default_rng([seed, 0, c])``: the same seed and chunk size give byte-identical shards.

**Feature breadth** (``features``, :mod:`~data_pipeline.datasets.synthetic_features`): item text,
search queries, context, point-in-time item counters and topic affinities, generated with the
chunks from their own random streams (the columns above do not change when they are on).

**Time span.** Session s has timestamp ``start_timestamp + s × session_interval_s``; the default
world (1M events, 10 slots, 10 s) spans 100k sessions ≈ 11.6 days, so hours and weekdays vary and
the default counter windows (1h, 1d, 7d) all differ. ``manifest.extra["time_span_s"]`` gives the
first and last session timestamps.

**Truth.** ``truth/user_factors.npy`` [N, d], ``truth/item_factors.npy`` [M, d],
``truth/item_bias.npy`` [M] and ``truth/item_popularity.npy`` [M] (candidate-sampling
probability), ``truth/item_promotion.npy`` [M] when promotion is on, ``truth/item_launch.npy``
[M] (launch point as a fraction of the feed; ``WorldConfig.new_item_fraction``) with new items; with topics (text, search
or affinity groups) ``truth/topic_directions.npy`` [T, d], ``truth/item_topics.npy`` [M, T] and
``truth/user_topics.npy`` [N, T]; paths and sha256 in ``manifest.extra["truth"]``. Raw item titles
(``raw/items_text.parquet``: item_id, text) and the search log (``raw/search_queries.parquet``:
user_id, timestamp, query) are listed in ``manifest.extra["raw"]``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.datasets.output import clear_output, save_array, write_side_table
from data_pipeline.datasets.split import TemporalThresholds, session_quantiles
from data_pipeline.datasets.synthetic_feature_stream import FeatureStream
from data_pipeline.datasets.synthetic_features import SyntheticFeatures
from data_pipeline.datasets.synthetic_feed import (
    HISTORY_ACTIONS,
    LABELS,
    FeedChunk,
    HistoryState,
    session_histories,
    simulate_feed,
    sort_clicks,
    truncate_feed,
    update_state,
)
from data_pipeline.datasets.synthetic_rows import impression_table
from data_pipeline.datasets.synthetic_world import SyntheticWorld, WorldConfig, build_world
from data_pipeline.manifest import Manifest, SplitInfo
from data_pipeline.schema import (
    HISTORY_ITEMS,
    ITEM_ID,
    EventSchema,
    FeatureKind,
    FeatureSpec,
    Side,
)
from data_pipeline.shard_writer import ShardWriter

logger = logging.getLogger(__name__)

FEED_STREAM = 0
USER_FEATURES = ("user_id", "segment", "region", "age_bucket")
ITEM_FEATURES = ("item_id", "category", "brand")
EVENT_SPLITS = ("train", "valid", "test")
DEFAULT_CHUNK_EVENTS = 1 << 18
EVAL_ROW_GROUP_DIVISOR = 8


@dataclass(frozen=True)
class SyntheticRun:
    """What to generate and how to cut it.

    Args:
        events: E impressions in total.
        seed: seed of the world and of every chunk's stream.
        history_length: H.
        sessions: ``ceil(E / P)``; the last session may be cut short.
        sessions_per_chunk: sessions simulated and written per step.
        valid_start, test_start: first session index of ``valid`` and of ``test``.
        valid_fraction, test_fraction: the shares of sessions those starts were cut at.
    """

    events: int
    seed: int
    history_length: int
    sessions: int
    sessions_per_chunk: int
    valid_start: int
    test_start: int
    valid_fraction: float
    test_fraction: float

    @classmethod
    def plan(
        cls,
        events: int,
        seed: int,
        history_length: int,
        positions: int,
        chunk_events: int,
        valid_fraction: float,
        test_fraction: float,
    ) -> SyntheticRun:
        """E ``events`` in sessions of P ``positions`` slots, ``chunk_events`` per step, cut by
        session index at the held-out fractions."""
        sessions = math.ceil(events / positions)
        return cls(
            events=events,
            seed=seed,
            history_length=history_length,
            sessions=sessions,
            sessions_per_chunk=max(1, chunk_events // positions),
            valid_start=int(sessions * (1 - valid_fraction - test_fraction)),
            test_start=int(sessions * (1 - test_fraction)),
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
        )

    def split_masks(self, feed: FeedChunk) -> dict[str, np.ndarray]:
        """[R] bool row masks: train keeps every impression, valid/test only clicks."""
        click = feed.labels["click"] == 1
        return {
            "train": feed.session < self.valid_start,
            "valid": click & (feed.session >= self.valid_start) & (feed.session < self.test_start),
            "test": click & (feed.session >= self.test_start),
        }


@dataclass(frozen=True)
class SyntheticSources:
    """Everything the tables of one run are built from.

    Args:
        world: latent factors, popularity and categorical features (N users, M items).
        config: the simulation knobs ``world`` was built with.
        features: the extra feature groups.
        stream: generator of those groups, chunk by chunk.
        schema: the dataset's schema.
    """

    world: SyntheticWorld
    config: WorldConfig
    features: SyntheticFeatures
    stream: FeatureStream
    schema: EventSchema


def prepare_synthetic(
    users: int,
    items: int,
    events: int,
    seed: int,
    out: Path,
    history_length: int = 50,
    dim: int = 16,
    *,
    world: WorldConfig | None = None,
    features: SyntheticFeatures | None = None,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    chunk_events: int = DEFAULT_CHUNK_EVENTS,
    row_group_rows: int = 65_536,
    rows_per_file: int = 1_000_000,
) -> Manifest:
    """Generate ``events`` impressions of a synthetic world into ``out``; return the manifest.

    Args:
        users, items: N users and M items (ids ``0 .. n-1``).
        events: E impressions simulated (train rows + all eval-window impressions).
        seed: the world and the feed are a pure function of it (and of ``chunk_events``).
        out: dataset directory to (re)write.
        history_length: H; dim: d of the latent factors.
        world: simulation knobs (``WorldConfig()`` by default).
        features: extra feature groups (text, search, context, counters, topic affinity) and their
            knobs; by default ``SyntheticFeatures()``, all of them; ``SyntheticFeatures.none()``
            writes ids, history and categorical features only.
        valid_fraction, test_fraction: shares of sessions (by time) held out.
        chunk_events: impressions simulated and written per step (bounds memory).
        row_group_rows, rows_per_file: Parquet layout; valid/test use ``row_group_rows // 8``.
    """
    config = world if world is not None else WorldConfig()
    breadth = features if features is not None else SyntheticFeatures()
    _check_arguments(users, items, events, chunk_events, valid_fraction, test_fraction)
    run = SyntheticRun.plan(
        events, seed, history_length, config.positions, chunk_events, valid_fraction, test_fraction
    )
    out = Path(out)
    clear_output(out, extra_dirs=("truth", "raw"))
    truth = build_world(users, items, dim, seed, config)
    schema = synthetic_schema(breadth)
    stream = FeatureStream(truth, config, breadth, seed, out, run.valid_start)
    sources = SyntheticSources(truth, config, breadth, stream, schema)
    splits, counts, raw_files = write_tables(out, sources, run, row_group_rows, rows_per_file)
    sizes = {"users": users, "items": items, "dim": dim, "chunk_events": chunk_events}
    manifest = Manifest(
        dataset="synthetic",
        schema=schema,
        tables={**truth.table_sizes, **breadth.tables()},
        splits=splits,
        history_length=history_length,
        source={"kind": "synthetic", "seed": seed},
        extra=_manifest_extra(out, sources, run, sizes, counts, raw_files),
        counters=stream.statistics.to_manifest(),
    )
    manifest.save(out)
    logger.info("wrote %s: %s", out, {name: info.rows for name, info in splits.items()})
    return manifest


def _check_arguments(
    users: int,
    items: int,
    events: int,
    chunk_events: int,
    valid_fraction: float,
    test_fraction: float,
) -> None:
    """Raise before anything is written when a size is not positive or nothing is left to train."""
    if min(users, items, events, chunk_events) <= 0 or not 0 <= valid_fraction + test_fraction < 1:
        raise ValueError(
            "prepare_synthetic: need users, items, events, chunk_events > 0 and "
            f"valid_fraction + test_fraction in [0, 1); got {users=}, {items=}, {events=}, "
            f"{chunk_events=}, {valid_fraction=}, {test_fraction=}"
        )


def write_tables(
    out: Path, sources: SyntheticSources, run: SyntheticRun, row_group_rows: int, rows_per_file: int
) -> tuple[dict[str, SplitInfo], dict[str, int], dict[str, dict[str, str]]]:
    """Write ``train/``, ``valid/``, ``test/`` (generated chunk by chunk), then ``users/`` and
    ``items/`` (with the stream's train-only item counters).

    Returns:
        splits: split name -> its files, event splits first.
        counts: the feed's counts and ``<split>_rows`` of every split.
        raw_files: the stream's raw side files (``manifest.extra["raw"]``).
    """
    eval_group_rows = max(1, row_group_rows // EVAL_ROW_GROUP_DIVISOR)
    # valid/test hold ~1% of the rows (clicks of 10% of the time): smaller groups keep them
    # splittable across ranks and workers.
    group_rows = {"train": row_group_rows} | dict.fromkeys(("valid", "test"), eval_group_rows)
    schema = sources.schema
    writers = {
        name: ShardWriter(out, name, schema.event_arrow_schema(), rows_per_file, group_rows[name])
        for name in EVENT_SPLITS
    }
    world, stream = sources.world, sources.stream
    counts = generate_events(world, sources.config, run, writers, stream)
    splits: dict[str, SplitInfo] = {name: writer.close() for name, writer in writers.items()}
    item_counters, raw_files = stream.finish()
    user_ids = np.arange(world.user_factors.shape[0])
    user_columns = {**world.user_features, **stream.user_columns(), "user_id": user_ids}
    item_columns = {
        **world.item_features,
        **stream.item_columns(),
        **item_counters,
        "item_id": np.arange(world.item_factors.shape[0]),
    }
    splits["users"] = write_side_table(out, schema, Side.USER, user_columns, row_group_rows)
    splits["items"] = write_side_table(out, schema, Side.ITEM, item_columns, row_group_rows)
    counts |= {f"{name}_rows": info.rows for name, info in splits.items()}
    return splits, counts, raw_files


def _manifest_extra(
    out: Path,
    sources: SyntheticSources,
    run: SyntheticRun,
    sizes: dict[str, int],
    counts: dict[str, int],
    raw_files: dict[str, dict[str, str]],
) -> dict[str, object]:
    """``manifest.extra``; writes ``truth/`` (``sizes``: users, items, dim and chunk_events)."""
    config, breadth = sources.config, sources.features
    return {
        "generator": {
            "events": run.events,
            "seed": run.seed,
            **sizes,
            "valid_fraction": run.valid_fraction,
            "test_fraction": run.test_fraction,
            **config.to_json(),
            "features": breadth.to_json(),
        },
        "split_rule": (
            f"by session time: train = first {1 - run.valid_fraction - run.test_fraction:g} of "
            f"sessions, every impression; valid = next {run.valid_fraction:g}, test = last "
            f"{run.test_fraction:g}, clicked impressions only"
        ),
        "split_start_session": {"valid": run.valid_start, "test": run.test_start},
        "split": _split_record(config, run),
        "counts": counts,
        "truth": save_truth(out, sources.world, sources.stream),
        "raw": raw_files,
        "time_span_s": [
            config.start_timestamp,
            config.start_timestamp + (run.sessions - 1) * config.session_interval_s,
        ],
        "relevance": _relevance_rule(breadth),
    }


def generate_events(
    world: SyntheticWorld,
    config: WorldConfig,
    run: SyntheticRun,
    writers: dict[str, ShardWriter],
    stream: FeatureStream,
) -> dict[str, int]:
    """Simulate the feed chunk by chunk, writing each chunk's rows before the next is drawn
    (extra features of the chunk come from ``stream``, before eval rows are dropped)."""
    state = HistoryState.empty(int(world.user_factors.shape[0]), run.history_length)
    counts = {"impressions": 0, "clicks": 0, "eval_impressions_dropped": 0}
    for chunk_index, first in enumerate(range(0, run.sessions, run.sessions_per_chunk)):
        sessions = min(run.sessions_per_chunk, run.sessions - first)
        rng = np.random.default_rng([run.seed, FEED_STREAM, chunk_index])
        feed = simulate_feed(
            world, config, first, sessions, rng, stream.relevance_shift(chunk_index), run.sessions
        )
        feed = truncate_feed(feed, run.events - counts["impressions"])
        clicks = sort_clicks(feed, first, sessions)
        histories = session_histories(feed, clicks, state, first, config, run.history_length)
        update_state(state, clicks, np.unique(feed.user[feed.labels["click"] == 1]))
        extra = stream.chunk(feed, chunk_index)
        masks = run.split_masks(feed)
        for name, mask in masks.items():
            if mask.any():
                rows = np.flatnonzero(mask)
                writers[name].write(impression_table(world, config, feed, histories, rows, extra))
        counts["impressions"] += int(feed.user.shape[0])
        counts["clicks"] += int(feed.labels["click"].sum())
        counts["eval_impressions_dropped"] += int(
            np.count_nonzero(feed.session >= run.valid_start)
            - np.count_nonzero(masks["valid"] | masks["test"])
        )
        logger.debug("chunk %d: %d impressions", chunk_index, feed.user.shape[0])
    return counts


def _split_record(config: WorldConfig, run: SyntheticRun) -> dict[str, object]:
    """``manifest.extra["split"]``: the session split as a temporal one (T1, T2, quantiles)."""
    valid_quantile, test_quantile = session_quantiles(run.valid_fraction, run.test_fraction)
    thresholds = TemporalThresholds(
        valid_start=config.start_timestamp + run.valid_start * config.session_interval_s,
        test_start=config.start_timestamp + run.test_start * config.session_interval_s,
        valid_quantile=valid_quantile,
        test_quantile=test_quantile,
    )
    record = thresholds.to_manifest("session indices")
    record["queries"] = "every clicked valid/test impression is one query row"
    return record


def _relevance_rule(features: SyntheticFeatures) -> str:
    rule = "u · v + item_bias (truth/user_factors, item_factors, item_bias)"
    if features.device_effect:
        rule += (
            f" + {features.device_effect:g} × device_topics[ctx_device] · item_topics[item] "
            "(truth/device_topics, item_topics)"
        )
    return rule


def synthetic_schema(features: SyntheticFeatures | None = None) -> EventSchema:
    breadth = features if features is not None else SyntheticFeatures.none()
    user = [FeatureSpec(n, Side.USER, FeatureKind.ID, n) for n in USER_FEATURES]
    history = FeatureSpec(HISTORY_ITEMS, Side.USER, FeatureKind.IDS, ITEM_ID)
    item = [FeatureSpec(n, Side.ITEM, FeatureKind.ID, n) for n in ITEM_FEATURES]
    extra_user, extra_item = breadth.specs()
    return EventSchema(
        features=(*user, *extra_user, history, *item, *extra_item),
        labels=LABELS,
        history_actions=HISTORY_ACTIONS,
        has_position=True,
        has_ranker_score=True,
        has_impression_negatives=True,
        has_history_timestamps=True,
    )


def save_truth(
    out: Path, world: SyntheticWorld, stream: FeatureStream
) -> dict[str, dict[str, str]]:
    arrays = {
        "user_factors": world.user_factors,
        "item_factors": world.item_factors,
        "item_bias": world.item_bias,
        "item_popularity": world.item_popularity,
    }
    if world.item_promotion.any():
        arrays["item_promotion"] = world.item_promotion
    if world.item_launch.any():
        arrays["item_launch"] = world.item_launch
    if stream.topics is not None:
        arrays["topic_directions"] = stream.topics.directions
        arrays["item_topics"] = stream.topics.item_topics
        arrays["user_topics"] = stream.topics.user_topics
    if stream.device_topics is not None:
        arrays["device_topics"] = stream.device_topics.astype(np.float32)
    return {name: save_array(out, f"truth/{name}.npy", array) for name, array in arrays.items()}
