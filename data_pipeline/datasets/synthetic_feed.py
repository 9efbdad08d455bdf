"""One chunk of the synthetic feed: sessions served by the logged ranker, user feedback, and the
rolling per-user click histories those sessions were served with.

All functions are vectorized over a chunk; the only state carried between chunks is
:class:`HistoryState` (``[users, H]`` arrays), so memory does not grow with the number of events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_pipeline.datasets.history import backward_gather_index, jagged_offsets
from data_pipeline.datasets.synthetic_world import SyntheticWorld, WorldConfig, sample_from_cdf
from data_pipeline.schema import HISTORY_ITEMS, HISTORY_TIMESTAMPS, history_action_column

LABELS = ("click", "like", "long_view")
HISTORY_ACTIONS = ("like", "long_view")


@dataclass
class HistoryState:
    """Per-user rolling click history, newest first.

    Args:
        items: [N, H] int32 clicked item ids; only the first ``length[u]`` of row u are valid.
        actions: action name -> [N, H] int8 aligned series.
        sessions: [N, H] int64 global session index of each click (its time).
        length: [N] int32 valid entries per user.
    """

    items: np.ndarray
    actions: dict[str, np.ndarray]
    sessions: np.ndarray
    length: np.ndarray

    @staticmethod
    def empty(users: int, history_length: int) -> HistoryState:
        return HistoryState(
            items=np.zeros((users, history_length), dtype=np.int32),
            actions={a: np.zeros((users, history_length), dtype=np.int8) for a in HISTORY_ACTIONS},
            sessions=np.zeros((users, history_length), dtype=np.int64),
            length=np.zeros(users, dtype=np.int32),
        )


@dataclass(frozen=True)
class ChunkClicks:
    """A chunk's clicks sorted by (user, session, position), the newest last per user.

    Args:
        key: [C] int64 ``user * (sessions + 1) + session``, ascending.
        items: [C] int64 clicked item ids.
        actions: action name -> [C] int8.
        click_sessions: [C] int64 global session index of each click.
        sessions: S, sessions in the chunk.
    """

    key: np.ndarray
    items: np.ndarray
    actions: dict[str, np.ndarray]
    click_sessions: np.ndarray
    sessions: int


@dataclass(frozen=True)
class FeedChunk:
    """One chunk of impressions, rows in (session, position) order; R = S × P (last may be cut).

    Args:
        user, item, session: [R] int64 (session is the global session index).
        position: [R] int32.
        labels: label name -> [R] int8.
        ranker_score: [R] float32.
    """

    user: np.ndarray
    item: np.ndarray
    session: np.ndarray
    position: np.ndarray
    labels: dict[str, np.ndarray]
    ranker_score: np.ndarray


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate_feed(
    world: SyntheticWorld,
    config: WorldConfig,
    first_session: int,
    sessions: int,
    rng: np.random.Generator,
    relevance_shift: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    total_sessions: int | None = None,
) -> FeedChunk:
    """Serve ``sessions`` sessions (global indices from ``first_session``) and log the feed.

    With item launches (``world.item_launch``; ``total_sessions`` gives the feed's length), a
    candidate not launched at its session's time is redrawn from the popularity distribution.

    ``relevance_shift(user [S], candidates [S, K]) -> [S, K]``, when given, is added to the true
    relevance (a context effect, e.g. the session's device favouring some topics).

    The ranker orders candidates by ``ranker_score + item_promotion`` (promotion is 0 when off)
    and, in a ``shuffled_fraction`` of sessions, shows its top P in random order; the logged
    ``ranker_score`` stays its relevance estimate ``relevance + noise`` either way.
    """
    k, p = config.candidates_per_session, config.positions
    user = sample_from_cdf(world.user_activity_cdf, (sessions,), rng)
    candidates = sample_from_cdf(world.item_popularity_cdf, (sessions, k), rng)
    if total_sessions is not None and world.item_launch.any():
        candidates = launched_candidates(world, candidates, first_session, total_sessions, rng)
    candidates = np.sort(candidates, axis=1)
    affinity = np.einsum("sd,skd->sk", world.user_factors[user], world.item_factors[candidates])
    relevance = affinity + world.item_bias[candidates]
    if relevance_shift is not None:
        relevance = relevance + relevance_shift(user, candidates)
    score = (relevance + config.ranker_noise_std * rng.standard_normal((sessions, k))).astype(
        np.float32
    )
    top = logged_ranking(world, config, candidates, score, rng)
    shown = np.take_along_axis(candidates, top, axis=1)
    shown_relevance = np.take_along_axis(relevance, top, axis=1)
    shown_affinity = np.take_along_axis(affinity, top, axis=1)
    examination = (1.0 + np.arange(p)) ** -config.examination_power
    click = rng.random((sessions, p)) < examination * sigmoid(shown_relevance)
    like = click & (rng.random((sessions, p)) < sigmoid(shown_relevance + config.like_offset))
    long_view = click & (
        rng.random((sessions, p)) < sigmoid(shown_affinity + config.long_view_offset)
    )
    return FeedChunk(
        user=np.repeat(user, p),
        item=shown.reshape(-1),
        session=np.repeat(np.arange(first_session, first_session + sessions, dtype=np.int64), p),
        position=np.tile(np.arange(p, dtype=np.int32), sessions),
        labels={
            "click": click.reshape(-1).astype(np.int8),
            "like": like.reshape(-1).astype(np.int8),
            "long_view": long_view.reshape(-1).astype(np.int8),
        },
        ranker_score=np.take_along_axis(score, top, axis=1).reshape(-1),
    )


def logged_ranking(
    world: SyntheticWorld,
    config: WorldConfig,
    candidates: np.ndarray,
    score: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """The logged ranker's slots: [S, K] sorted candidates and their [S, K] float32 scores ->
    [S, P] candidate indices in slot order (by score plus promotion, then shuffled sessions)."""
    # Candidates are sorted per row, so repeats are adjacent; ranking them last means an item is
    # shown twice in a session only when fewer than P distinct candidates were drawn.
    repeated = np.zeros_like(candidates, dtype=bool)
    repeated[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    ordering = score + world.item_promotion[candidates] if config.promotion_std > 0 else score
    ranking_key = np.where(repeated, -np.inf, ordering)
    top = np.argsort(-ranking_key, axis=1, kind="stable")[:, : config.positions]
    if config.shuffled_fraction > 0:
        top = shuffle_sessions(top, config.shuffled_fraction, rng)
    return top


LAUNCH_REDRAWS = 16


def launched_candidates(
    world: SyntheticWorld,
    candidates: np.ndarray,
    first_session: int,
    total_sessions: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """[S, K] candidates with every item not yet launched at its session redrawn (up to
    :data:`LAUNCH_REDRAWS` times, then replaced by the most popular item launched at 0)."""
    sessions = candidates.shape[0]
    now = (first_session + np.arange(sessions, dtype=np.float64)) / total_sessions
    out = candidates.copy()
    for _ in range(LAUNCH_REDRAWS):
        pending = world.item_launch[out] > now[:, None]
        if not pending.any():
            return out
        out[pending] = sample_from_cdf(world.item_popularity_cdf, (int(pending.sum()),), rng)
    pending = world.item_launch[out] > now[:, None]
    fallback = int(np.argmax(np.where(world.item_launch == 0, world.item_popularity, -1.0)))
    out[pending] = fallback
    return out


def shuffle_sessions(top: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """top [S, P] candidate indices in slot order -> the same, with each session's slots put in
    a uniformly random order with probability ``fraction`` (the shown set is unchanged)."""
    shuffled = np.asarray(rng.random(top.shape[0])) < fraction
    order = np.argsort(rng.random(top.shape), axis=1)
    return np.where(shuffled[:, None], np.take_along_axis(top, order, axis=1), top)


def truncate_feed(feed: FeedChunk, rows: int) -> FeedChunk:
    if rows >= feed.user.shape[0]:
        return feed
    return FeedChunk(
        user=feed.user[:rows],
        item=feed.item[:rows],
        session=feed.session[:rows],
        position=feed.position[:rows],
        labels={name: values[:rows] for name, values in feed.labels.items()},
        ranker_score=feed.ranker_score[:rows],
    )


def sort_clicks(feed: FeedChunk, first_session: int, sessions: int) -> ChunkClicks:
    """The chunk's clicks ordered by (user, session, position)."""
    clicked = np.flatnonzero(feed.labels["click"])
    local_session = feed.session[clicked] - first_session
    key = feed.user[clicked] * (sessions + 1) + local_session
    order = np.argsort(key, kind="stable")  # rows are already in (session, position) order
    rows = clicked[order]
    return ChunkClicks(
        key=key[order],
        items=feed.item[rows],
        actions={a: feed.labels[a][rows] for a in HISTORY_ACTIONS},
        click_sessions=feed.session[rows],
        sessions=sessions,
    )


def gather_history(
    state: HistoryState,
    clicks: ChunkClicks,
    user: np.ndarray,
    local_session: np.ndarray,
    history_length: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Histories of ``user`` ([Q] int64) as of the start of ``local_session`` ([Q] int64).

    Newest first: the user's clicks earlier in this chunk (latest first), then the state carried
    from earlier chunks, cut at H.

    Returns:
        lengths [Q] int64, item ids [sum(lengths)] int64, action -> [sum(lengths)] int8,
        global session index of each history click [sum(lengths)] int64.
    """
    base = user * (clicks.sessions + 1)
    start = np.searchsorted(clicks.key, base, side="left")
    end = np.searchsorted(clicks.key, base + local_session, side="left")
    from_chunk = np.minimum(end - start, history_length)
    lengths = np.minimum(from_chunk + state.length[user], history_length)
    offsets = np.cumsum(lengths) - lengths
    row_of_value = np.repeat(np.arange(user.shape[0]), lengths)
    step = np.arange(int(lengths.sum()), dtype=np.int64) - offsets[row_of_value]
    in_chunk = step < from_chunk[row_of_value]
    chunk_index = backward_gather_index(end, from_chunk)
    state_user = user[row_of_value[~in_chunk]]
    state_slot = (step - from_chunk[row_of_value])[~in_chunk]

    def series(from_chunk: np.ndarray, from_state: np.ndarray, dtype: type) -> np.ndarray:
        values = np.empty(step.shape[0], dtype=dtype)
        values[in_chunk] = from_chunk[chunk_index]
        values[~in_chunk] = from_state[state_user, state_slot]
        return values

    items = series(clicks.items, state.items, np.int64)
    actions = {a: series(clicks.actions[a], state.actions[a], np.int8) for a in HISTORY_ACTIONS}
    sessions = series(clicks.click_sessions, state.sessions, np.int64)
    return lengths, items, actions, sessions


def update_state(state: HistoryState, clicks: ChunkClicks, clicking_users: np.ndarray) -> None:
    """Fold the chunk's clicks into the rolling state of ``clicking_users`` ([U'] int64)."""
    history_length = state.items.shape[1]
    end_of_chunk = np.full(clicking_users.shape[0], clicks.sessions, dtype=np.int64)
    lengths, items, actions, sessions = gather_history(
        state, clicks, clicking_users, end_of_chunk, history_length
    )
    row = np.repeat(clicking_users, lengths)
    slot = np.arange(items.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    state.items[row, slot] = items
    state.sessions[row, slot] = sessions
    for name in HISTORY_ACTIONS:
        state.actions[name][row, slot] = actions[name]
    state.length[clicking_users] = lengths


def session_histories(
    feed: FeedChunk,
    clicks: ChunkClicks,
    state: HistoryState,
    first_session: int,
    config: WorldConfig,
    history_length: int,
) -> dict[str, pa.ListArray]:
    """The history each session of the chunk was served with, one list per session.

    Returns:
        column name (``hist_item_ids``, ``hist_<action>``, ``hist_timestamps``) -> S lists,
        S = sessions in the chunk.
    """
    session_rows = np.arange(0, feed.user.shape[0], config.positions)
    lengths, items, actions, sessions = gather_history(
        state,
        clicks,
        feed.user[session_rows],
        feed.session[session_rows] - first_session,
        history_length,
    )
    offsets = pa.array(jagged_offsets(lengths))
    lists = {HISTORY_ITEMS: pa.ListArray.from_arrays(offsets, pa.array(items))}
    times = config.start_timestamp + sessions * config.session_interval_s
    lists[HISTORY_TIMESTAMPS] = pa.ListArray.from_arrays(offsets, pa.array(times, pa.int64()))
    for name in HISTORY_ACTIONS:
        lists[history_action_column(name)] = pa.ListArray.from_arrays(
            offsets, pa.array(actions[name])
        )
    return lists
