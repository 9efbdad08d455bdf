"""Search queries of the synthetic feed and the query history every session is served with.

Before each session its user searches with probability ``search_probability`` (one query per
session at most, logged at the session's timestamp; words from
:func:`~data_pipeline.datasets.synthetic_topics.draw_query_words`). A session's
``search_query_tokens`` are the hashed ids of the user's last K queries of **earlier** sessions
(strictly before its timestamp, so never the query issued with the session itself), newest first,
each query's unigrams then bigrams, flattened; ``search_query_tokens_weights`` are their idf.

Like the click history, a per-user rolling state (``[users, K, query_words]`` word indices)
carries the last K queries from chunk to chunk; memory is bounded by users, not by events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_pipeline.datasets.history import backward_gather_index, jagged_offsets
from data_pipeline.datasets.synthetic_topics import (
    TopicConfig,
    TopicWorld,
    WordHasher,
    draw_query_words,
)


@dataclass
class QueryState:
    """Per-user last K queries, newest first.

    Args:
        words: [N, K, L] int32 word indices of each query (-1 padded).
        sessions: [N, K] int64 global session index of each query.
        length: [N] int32 valid queries per user.
    """

    words: np.ndarray
    sessions: np.ndarray
    length: np.ndarray

    @staticmethod
    def empty(users: int, last_queries: int, query_words: int) -> QueryState:
        return QueryState(
            words=np.full((users, last_queries, query_words), -1, dtype=np.int32),
            sessions=np.zeros((users, last_queries), dtype=np.int64),
            length=np.zeros(users, dtype=np.int32),
        )


@dataclass(frozen=True)
class ChunkQueries:
    """A chunk's queries sorted by (user, session).

    Args:
        key: [C] int64 ``user * (sessions + 1) + local session``, ascending.
        user: [C] int64.
        session: [C] int64 global session index (the query's time).
        words: [C, L] int32 word indices (-1 padded).
        sessions: S, sessions in the chunk.
    """

    key: np.ndarray
    user: np.ndarray
    session: np.ndarray
    words: np.ndarray
    sessions: int


def draw_chunk_queries(
    topics: TopicWorld,
    config: TopicConfig,
    session_user: np.ndarray,
    first_session: int,
    probability: float,
    rng: np.random.Generator,
) -> ChunkQueries:
    """Queries issued before the chunk's sessions (``session_user``: [S] int64 user per session)."""
    sessions = session_user.shape[0]
    searched = np.flatnonzero(rng.random(sessions) < probability)
    user = session_user[searched].astype(np.int64)
    words = draw_query_words(topics, user, config, rng)
    key = user * (sessions + 1) + searched
    order = np.argsort(key, kind="stable")
    return ChunkQueries(
        key=key[order],
        user=user[order],
        session=(first_session + searched)[order].astype(np.int64),
        words=words[order],
        sessions=sessions,
    )


def gather_queries(
    state: QueryState, queries: ChunkQueries, user: np.ndarray, local_session: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Last K queries of ``user`` ([R] int64) strictly before ``local_session`` ([R] int64).

    Returns:
        lengths [R] int64, word indices [sum(lengths), L] int32 and global sessions
        [sum(lengths)] int64 of the queries, newest first per row.
    """
    last = state.words.shape[1]
    base = user * (queries.sessions + 1)
    start = np.searchsorted(queries.key, base, side="left")
    end = np.searchsorted(queries.key, base + local_session, side="left")
    from_chunk = np.minimum(end - start, last)
    lengths = np.minimum(from_chunk + state.length[user], last).astype(np.int64)
    row_of_value = np.repeat(np.arange(user.shape[0]), lengths)
    step = (
        np.arange(int(lengths.sum()), dtype=np.int64) - (np.cumsum(lengths) - lengths)[row_of_value]
    )
    in_chunk = step < from_chunk[row_of_value]
    chunk_index = backward_gather_index(end, from_chunk)
    state_user = user[row_of_value[~in_chunk]]
    state_slot = (step - from_chunk[row_of_value])[~in_chunk]
    words = np.empty((step.shape[0], state.words.shape[2]), dtype=np.int32)
    words[in_chunk] = queries.words[chunk_index]
    words[~in_chunk] = state.words[state_user, state_slot]
    sessions = np.empty(step.shape[0], dtype=np.int64)
    sessions[in_chunk] = queries.session[chunk_index]
    sessions[~in_chunk] = state.sessions[state_user, state_slot]
    return lengths, words, sessions


def update_query_state(state: QueryState, queries: ChunkQueries) -> None:
    """Fold the chunk's queries into the rolling state of the users who searched."""
    users = np.unique(queries.user)
    end_of_chunk = np.full(users.shape[0], queries.sessions, dtype=np.int64)
    lengths, words, sessions = gather_queries(state, queries, users, end_of_chunk)
    row = np.repeat(users, lengths)
    slot = np.arange(words.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    state.words[row, slot] = words
    state.sessions[row, slot] = sessions
    state.length[users] = lengths


def session_search_tokens(
    state: QueryState,
    queries: ChunkQueries,
    session_user: np.ndarray,
    hasher: WordHasher,
    idf: np.ndarray,
) -> tuple[pa.ListArray, pa.ListArray]:
    """The query history each session of the chunk was served with.

    Args:
        session_user: [S] int64 user of each session of the chunk.
        idf: [vocab_size] float32 weight of each text id.
    Returns:
        ``search_query_tokens`` ids and weights, [S] lists each.
    """
    local = np.arange(session_user.shape[0], dtype=np.int64)
    lengths, words, _ = gather_queries(state, queries, session_user.astype(np.int64), local)
    id_counts, ids = hasher.ids(words)
    # Ids of one session are its queries' ids, consecutive and newest query first.
    session_of_query = np.repeat(np.arange(session_user.shape[0]), lengths)
    per_session = np.bincount(session_of_query, weights=id_counts, minlength=len(local))
    offsets = pa.array(jagged_offsets(per_session.astype(np.int64)))
    return (
        pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int64())),
        pa.ListArray.from_arrays(offsets, pa.array(idf[ids], pa.float32())),
    )
