"""The state that carries :mod:`~data_pipeline.datasets.synthetic_features` from chunk to chunk:
rolling query histories, streaming counters and their train statistics, and the raw query log.

Memory: ``[users, K, query_words]`` query words, plus the impressions of the longest counter
window (:class:`~data_pipeline.counters.StreamingCounters`), plus one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.counters import CounterStatistics, StreamingCounters
from data_pipeline.datasets.synthetic_features import (
    COUNTER_KINDS,
    DEVICE_EFFECT_STREAM,
    DEVICE_STREAM,
    ITEM_TEXT,
    SEARCH_TOKENS,
    SESSION_FEATURE_STREAM,
    TOPIC_AFFINITY,
    SyntheticFeatures,
    UserContext,
    build_user_context,
    draw_devices,
    session_context,
)
from data_pipeline.datasets.synthetic_feed import FeedChunk
from data_pipeline.datasets.synthetic_search import (
    ChunkQueries,
    QueryState,
    draw_chunk_queries,
    session_search_tokens,
    update_query_state,
)
from data_pipeline.datasets.synthetic_topics import TopicWorld, WordHasher, build_topics, join_words
from data_pipeline.datasets.synthetic_world import SyntheticWorld, WorldConfig
from data_pipeline.manifest import sha256_file
from data_pipeline.schema import FeatureGroup, weights_column
from data_pipeline.text import DocumentFrequency, TextHashConfig, idf_weight_column

RAW_ITEM_TEXT = "raw/items_text.parquet"
RAW_QUERIES = "raw/search_queries.parquet"
QUERY_LOG_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
    ]
)


@dataclass
class ChunkFeatures:
    """Feature columns of one chunk.

    Args:
        per_session: name -> [S] values (numpy ids or Arrow lists), one per session of the chunk.
        per_row: name -> [R] values, one per impression (counters; item text and topic
            affinity looked up by the row's item and user).
    """

    per_session: dict[str, np.ndarray | pa.Array] = field(default_factory=dict)
    per_row: dict[str, np.ndarray | pa.Array] = field(default_factory=dict)


class FeatureStream:
    """Generates the extra feature groups chunk by chunk (module docstring of
    :mod:`~data_pipeline.datasets.synthetic_features` for their meaning).

    Args:
        world, config: the synthetic world and its knobs (timestamps come from ``config``).
        features: the groups and their knobs.
        seed: the run's seed.
        out: dataset directory (raw text and query log go under ``raw/``).
        snapshot_session: first session not in ``train``; ``items/`` counters are taken just after
            the session before it.
    """

    def __init__(
        self,
        world: SyntheticWorld,
        config: WorldConfig,
        features: SyntheticFeatures,
        seed: int,
        out: Path,
        snapshot_session: int,
    ) -> None:
        self.world, self.config, self.features, self.seed = world, config, features, seed
        self.out = out
        users, items = world.user_factors.shape[0], world.item_factors.shape[0]
        self.num_items = items
        self.topics: TopicWorld | None = None
        self.item_text: tuple[pa.Array, pa.Array] | None = None
        if features.needs_topics:
            self.topics = build_topics(
                world.user_factors, world.item_factors, features.topics, seed
            )
            text_config = TextHashConfig(vocab_size=features.text_vocab_size)
            self.hasher = WordHasher(self.topics.words, text_config)
            title_ids = self.hasher.list_array(self.topics.title_words)
            self.idf = DocumentFrequency.empty(features.text_vocab_size).update(title_ids).idf()
            self.item_text = (title_ids, idf_weight_column(title_ids, self.idf))
        self.context: UserContext | None = None
        if features.has(FeatureGroup.CONTEXT):
            self.context = build_user_context(world.user_features["region"], features, seed)
        self.device_topics: np.ndarray | None = None
        if features.device_effect:
            effect_rng = np.random.default_rng([seed, DEVICE_EFFECT_STREAM])
            topics = features.topics.topics
            self.device_topics = effect_rng.standard_normal((features.devices, topics))
        self._devices: tuple[int, np.ndarray] | None = None
        self.queries = QueryState.empty(users, features.search_history, features.topics.query_words)
        self._query_log: pq.ParquetWriter | None = None
        self.counters = StreamingCounters(COUNTER_KINDS, features.windows)
        self.statistics = CounterStatistics()
        self.snapshot_session = snapshot_session
        self.snapshot: dict[str, np.ndarray] | None = None

    def timestamps(self, sessions: np.ndarray) -> np.ndarray:
        """[...] global session indices -> [...] int64 timestamps."""
        return self.config.start_timestamp + sessions * self.config.session_interval_s

    def item_columns(self) -> dict[str, np.ndarray | pa.Array]:
        """Static item-side columns, [M] each (text; counters come with :meth:`finish`)."""
        if self.item_text is None or not self.features.has(FeatureGroup.TEXT):
            return {}
        ids, weights = self.item_text
        return {ITEM_TEXT: ids, weights_column(ITEM_TEXT): weights}

    def user_columns(self) -> dict[str, np.ndarray | pa.Array]:
        """Static user-side columns, [N] each (topic affinity)."""
        if self.topics is None or not self.features.has(FeatureGroup.AFFINITY):
            return {}
        ids, weights = self.topics.affinity_arrow()
        return {TOPIC_AFFINITY: ids, weights_column(TOPIC_AFFINITY): weights}

    def _draw_devices(self, chunk_index: int, session_user: np.ndarray) -> np.ndarray:
        """[S] devices of the chunk's sessions; drawn once per chunk, from its own stream, so
        they are the same whether or not the device shifts relevance."""
        if self._devices is None or self._devices[0] != chunk_index:
            assert self.context is not None
            rng = np.random.default_rng([self.seed, DEVICE_STREAM, chunk_index])
            self._devices = (chunk_index, draw_devices(self.context, session_user, rng))
        return self._devices[1][: session_user.shape[0]]

    def relevance_shift(
        self, chunk_index: int
    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """The device effect on relevance for ``simulate_feed`` (None when off): ``(user [S],
        candidates [S, K]) -> [S, K]`` ``device_effect × device_topics[device] ·
        item_topics[candidate]``."""
        if self.device_topics is None:
            return None
        device_topics, topics = self.device_topics, self.topics
        assert topics is not None

        def shift(user: np.ndarray, candidates: np.ndarray) -> np.ndarray:
            device = self._draw_devices(chunk_index, user)
            pull = np.einsum("st,skt->sk", device_topics[device], topics.item_topics[candidates])
            return self.features.device_effect * pull

        return shift

    def chunk(self, feed: FeedChunk, chunk_index: int) -> ChunkFeatures:
        """Per-session and per-row columns of one chunk; advances every rolling state."""
        out = ChunkFeatures()
        session_rows = np.arange(0, feed.user.shape[0], self.config.positions)
        session_user = feed.user[session_rows].astype(np.int64)
        session_index = feed.session[session_rows]
        rng = np.random.default_rng([self.seed, SESSION_FEATURE_STREAM, chunk_index])
        if self.features.has(FeatureGroup.SEARCH):
            assert self.topics is not None
            queries = draw_chunk_queries(
                self.topics,
                self.features.topics,
                session_user,
                int(session_index[0]),
                self.features.search_probability,
                rng,
            )
            ids, weights = session_search_tokens(
                self.queries, queries, session_user, self.hasher, self.idf
            )
            out.per_session |= {SEARCH_TOKENS: ids, weights_column(SEARCH_TOKENS): weights}
            update_query_state(self.queries, queries)
            self._log_queries(queries)
        if self.context is not None:
            out.per_session |= session_context(
                self.context,
                session_user,
                self.timestamps(session_index),
                self._draw_devices(chunk_index, session_user),
                self.features.locales,
                rng,
            )
        if self.features.has(FeatureGroup.COUNTER):
            out.per_row |= self._count(feed)
        rows_of = {"item": pa.array(feed.item), "user": pa.array(feed.user)}
        for side, columns in (("item", self.item_columns()), ("user", self.user_columns())):
            out.per_row |= {name: values.take(rows_of[side]) for name, values in columns.items()}
        return out

    def _count(self, feed: FeedChunk) -> dict[str, np.ndarray]:
        """Counters of every impression of the chunk; train rows update the statistics, and the
        ``items/`` snapshot is taken when the chunk crosses into the eval sessions."""
        flags = {
            "view": np.ones(feed.item.shape[0], dtype=bool),
            "click": feed.labels["click"] == 1,
            "like": feed.labels["like"] == 1,
        }
        times = self.timestamps(feed.session)
        # Rows are in session order, so train rows are a prefix of the chunk.
        cut = int(np.searchsorted(feed.session, self.snapshot_session, side="left"))
        total = feed.item.shape[0]
        parts = []
        for begin, end, train in ((0, cut, True), (cut, total, False)):
            if not train and end > begin and self.snapshot is None:
                self.snapshot = self._snapshot()
            if end > begin:
                counts = self.counters.update(
                    feed.item[begin:end],
                    times[begin:end],
                    {kind: values[begin:end] for kind, values in flags.items()},
                )
                if train:
                    self.statistics.update(counts)
                parts.append(counts)
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _snapshot(self) -> dict[str, np.ndarray]:
        """Every item's counters as of the last train session's timestamp + 1: one query event
        per item with no kind flag set, so the queries count train impressions and nothing else
        (later chunks start at or after that time, so the counters stay exact)."""
        last_train = np.array([max(self.snapshot_session - 1, 0)], dtype=np.int64)
        at = int(self.timestamps(last_train)[0]) + 1
        no_kind = np.zeros(self.num_items, dtype=bool)
        return self.counters.update(
            np.arange(self.num_items, dtype=np.int64),
            np.full(self.num_items, at, dtype=np.int64),
            dict.fromkeys(COUNTER_KINDS, no_kind),
        )

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, str]]]:
        """(``items/`` counter columns [M] each, raw files ``{name: {path, sha256}}``)."""
        snapshot: dict[str, np.ndarray] = {}
        if self.features.has(FeatureGroup.COUNTER):
            snapshot = self.snapshot if self.snapshot is not None else self._snapshot()
        raw: dict[str, dict[str, str]] = {}
        if self.topics is not None:
            titles = pa.table({"item_id": np.arange(self.num_items), "text": self.topics.titles()})
            path = self.out / RAW_ITEM_TEXT
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(titles, path, compression="zstd")
            raw["items_text"] = {"path": RAW_ITEM_TEXT, "sha256": sha256_file(path)}
        if self.features.has(FeatureGroup.SEARCH):
            if self._query_log is None:  # no session at all: an empty log still documents it
                self._log_queries(None)
            assert self._query_log is not None
            self._query_log.close()
            raw["search_queries"] = {
                "path": RAW_QUERIES,
                "sha256": sha256_file(self.out / RAW_QUERIES),
            }
        return snapshot, raw

    def _log_queries(self, queries: ChunkQueries | None) -> None:
        if self._query_log is None:
            path = self.out / RAW_QUERIES
            path.parent.mkdir(parents=True, exist_ok=True)
            self._query_log = pq.ParquetWriter(path, QUERY_LOG_SCHEMA, compression="zstd")
        if queries is None or self.topics is None:
            return
        # Session order (the log's time order) rather than the (user, session) working order.
        order = np.argsort(queries.session, kind="stable")
        table = pa.table(
            {
                "user_id": queries.user[order],
                "timestamp": self.timestamps(queries.session[order]),
                "query": join_words(self.topics.words, queries.words[order]),
            },
            schema=QUERY_LOG_SCHEMA,
        )
        self._query_log.write_table(table)
