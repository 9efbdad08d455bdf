"""Feature breadth of the synthetic feed: item text, search queries, context, counters and topic
affinities, generated chunk by chunk alongside the impressions.

Groups (each switched on by :attr:`SyntheticFeatures.groups`):

* ``text``: ``item_text_tokens`` (item side, in ``items/`` and event rows): hashed title tokens
  (:mod:`~data_pipeline.datasets.synthetic_topics`) weighted by idf over the item titles.
* ``search``: ``search_query_tokens`` (user side, per event): the user's last K queries before the
  session (:mod:`~data_pipeline.datasets.synthetic_search`), idf from the item titles (one table).
* ``context`` (user side, per event): ``ctx_hour`` and ``ctx_weekday`` of the session timestamp
  (UTC), ``ctx_device`` (``devices`` ids, drawn per session from the user's own device
  preference, a Dirichlet(0.5) draw) and ``ctx_locale`` (``locales`` ids: the user's home locale,
  ``region mod locales`` for 85% of users and random otherwise, except in 5% of sessions, which
  use a random one).
* ``counter`` (item side): ``item_<kind>_count_<window>`` for kinds ``view`` (every impression),
  ``click`` and ``like``: point-in-time counts over **all** impressions (eval rows are counted
  before non-clicked eval impressions are dropped), window ``t - w <= s < t``; the impressions of
  one session share its timestamp, so they never count each other. ``items/`` holds the counts as
  of the last train session's timestamp + 1 over train impressions only; ``manifest.counters``
  holds the ``log1p`` statistics of the train rows.
* ``affinity``: ``user_topic_affinity`` (user side, in ``users/`` and event rows): the user's
  top-k topics by a noisy affinity, weighted by it (table ``topic``).

The feed itself (users, items, labels) does not depend on these features: they draw from their own
streams (``[seed, 3]`` for topics, ``[seed, 4]`` for user context preferences, ``[seed, 5, c]`` per
chunk, ``[seed, 6, c]`` for session devices, ``[seed, 7]`` for device effects), so turning groups
on or off leaves every other column unchanged. The one exception is opt-in:
``SyntheticFeatures.device_effect > 0`` lets the session's device shift true relevance (and so
clicks) by a small topic-dependent term.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.counters import DAY, DEFAULT_WINDOWS, HOUR, counter_name
from data_pipeline.datasets.event_features import (
    TEXT_TABLE,
    TIME_CONTEXT_TABLES,
    context_spec,
    counter_spec,
    counter_tables,
    text_spec,
    time_context,
)
from data_pipeline.datasets.synthetic_topics import TopicConfig
from data_pipeline.schema import FeatureGroup, FeatureKind, FeatureSpec, Side

ITEM_TEXT = "item_text_tokens"
SEARCH_TOKENS = "search_query_tokens"
DEVICE = "ctx_device"
LOCALE = "ctx_locale"
TOPIC_AFFINITY = "user_topic_affinity"
TOPIC_TABLE = "topic"
COUNTER_KINDS = ("view", "click", "like")
EXTRA_GROUPS = (
    FeatureGroup.TEXT,
    FeatureGroup.SEARCH,
    FeatureGroup.CONTEXT,
    FeatureGroup.COUNTER,
    FeatureGroup.AFFINITY,
)
CONTEXT_STREAM = 4
SESSION_FEATURE_STREAM = 5
DEVICE_STREAM = 6
DEVICE_EFFECT_STREAM = 7
_HOME_LOCALE_SHARE = 0.85
_TRAVEL_PROBABILITY = 0.05
_DEVICE_CONCENTRATION = 0.5
_WINDOW_UNITS = {"s": 1, "m": 60, "h": HOUR, "d": DAY, "w": 7 * DAY}


def parse_window(name: str) -> int:
    """``"90s"``, ``"10m"``, ``"1h"``, ``"7d"``, ``"2w"`` -> seconds."""
    match = re.fullmatch(r"(\d+)([smhdw])", name)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"counter window {name!r}: expected a positive <number><s|m|h|d|w>")
    return int(match.group(1)) * _WINDOW_UNITS[match.group(2)]


@dataclass(frozen=True)
class SyntheticFeatures:
    """Which feature groups the synthetic feed carries, and their knobs.

    Args:
        groups: groups generated on top of ids, history and categorical features (all by default).
        topics: topics, titles, queries and affinities.
        text_vocab_size: rows of the hashed ``text_tokens`` table (titles and queries).
        search_probability: chance that a user searches before a session.
        search_history: K, the last queries of a user kept per row.
        devices, locales: context cardinalities.
        counter_windows: window names (``"1h"``, see :func:`parse_window`); the default suits the
            default world, whose feed spans ~11.6 days.
        device_effect: strength of the device's pull on relevance (0 = none, the default; needs
            the context group and topics): ``relevance += device_effect × device_topics[device]
            · item_topics[item]`` with ``device_topics`` [D, T] ~ N(0, 1) (``truth/``), so the
            device context becomes predictive of clicks.
    """

    groups: tuple[FeatureGroup, ...] = EXTRA_GROUPS
    topics: TopicConfig = field(default_factory=TopicConfig)
    text_vocab_size: int = 1 << 15
    search_probability: float = 0.3
    search_history: int = 5
    devices: int = 3
    locales: int = 8
    counter_windows: tuple[str, ...] = tuple(DEFAULT_WINDOWS)
    device_effect: float = 0.0

    def __post_init__(self) -> None:
        unknown = [g for g in self.groups if g not in EXTRA_GROUPS]
        if unknown:
            raise ValueError(
                f"synthetic feature groups must be among {[g.value for g in EXTRA_GROUPS]}, "
                f"got {[g.value for g in unknown]}"
            )
        if not 0 <= self.search_probability <= 1 or min(self.devices, self.locales) < 1:
            raise ValueError(
                f"search_probability={self.search_probability} must be in [0, 1], devices="
                f"{self.devices} and locales={self.locales} >= 1"
            )
        if self.search_history < 1 or self.text_vocab_size < 2 or not self.counter_windows:
            raise ValueError(
                f"search_history={self.search_history} must be >= 1, text_vocab_size="
                f"{self.text_vocab_size} >= 2, counter_windows={self.counter_windows} non-empty"
            )
        for name in self.counter_windows:
            parse_window(name)
        if self.device_effect and not (self.has(FeatureGroup.CONTEXT) and self.needs_topics):
            raise ValueError(
                f"device_effect={self.device_effect} needs the context group and a topic group "
                "(text, search or affinity)"
            )

    @staticmethod
    def none() -> SyntheticFeatures:
        """Ids, history and categorical features only (the feed before feature breadth)."""
        return SyntheticFeatures(groups=())

    def has(self, group: FeatureGroup) -> bool:
        return group in self.groups

    @property
    def windows(self) -> dict[str, int]:
        return {name: parse_window(name) for name in self.counter_windows}

    @property
    def counter_names(self) -> list[str]:
        return [counter_name(k, w) for k in COUNTER_KINDS for w in self.counter_windows]

    def specs(self) -> tuple[list[FeatureSpec], list[FeatureSpec]]:
        """(extra user-side specs, extra item-side specs) in column order."""
        user: list[FeatureSpec] = []
        item: list[FeatureSpec] = []
        if self.has(FeatureGroup.AFFINITY):
            user.append(
                FeatureSpec(
                    TOPIC_AFFINITY,
                    Side.USER,
                    FeatureKind.IDS,
                    TOPIC_TABLE,
                    FeatureGroup.AFFINITY,
                    weighted=True,
                )
            )
        if self.has(FeatureGroup.CONTEXT):
            user += [context_spec(n) for n in (*TIME_CONTEXT_TABLES, DEVICE, LOCALE)]
        if self.has(FeatureGroup.SEARCH):
            user.append(text_spec(SEARCH_TOKENS, Side.USER, per_event=True))
        if self.has(FeatureGroup.TEXT):
            item.append(text_spec(ITEM_TEXT, Side.ITEM))
        if self.has(FeatureGroup.COUNTER):
            item += [counter_spec(n) for n in self.counter_names]
        return user, item

    def tables(self) -> dict[str, int]:
        tables: dict[str, int] = {}
        if self.has(FeatureGroup.AFFINITY):
            tables[TOPIC_TABLE] = self.topics.topics
        if self.has(FeatureGroup.CONTEXT):
            tables |= dict(TIME_CONTEXT_TABLES) | {DEVICE: self.devices, LOCALE: self.locales}
        if self.has(FeatureGroup.TEXT) or self.has(FeatureGroup.SEARCH):
            tables[TEXT_TABLE] = self.text_vocab_size
        if self.has(FeatureGroup.COUNTER):
            tables |= counter_tables(self.counter_names)
        return tables

    @property
    def needs_topics(self) -> bool:
        return any(
            self.has(g) for g in (FeatureGroup.TEXT, FeatureGroup.SEARCH, FeatureGroup.AFFINITY)
        )

    def to_json(self) -> dict[str, object]:
        return {
            "groups": [g.value for g in self.groups],
            "topics": self.topics.to_json(),
            "text_vocab_size": self.text_vocab_size,
            "search_probability": self.search_probability,
            "search_history": self.search_history,
            "devices": self.devices,
            "locales": self.locales,
            "counter_windows": self.windows,
            "counter_kinds": list(COUNTER_KINDS),
        } | ({"device_effect": self.device_effect} if self.device_effect else {})


@dataclass(frozen=True)
class UserContext:
    """Args:
    device_preference: [N, D] float64 probability of each device per user.
    home_locale: [N] int64.
    """

    device_preference: np.ndarray
    home_locale: np.ndarray


def build_user_context(region: np.ndarray, features: SyntheticFeatures, seed: int) -> UserContext:
    """Per-user device preferences and home locales (``region``: [N] int64 user regions)."""
    rng = np.random.default_rng([seed, CONTEXT_STREAM])
    users = region.shape[0]
    preference = rng.dirichlet(np.full(features.devices, _DEVICE_CONCENTRATION), size=users)
    random_locale = rng.integers(features.locales, size=users)
    home = np.where(
        rng.random(users) < _HOME_LOCALE_SHARE, region % features.locales, random_locale
    )
    return UserContext(preference, home.astype(np.int64))


def draw_devices(
    context: UserContext, session_user: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """[S] users -> [S] int64 device of each session, from the user's preference."""
    cdf = np.cumsum(context.device_preference[session_user], axis=1)
    draws = np.asarray(rng.random(session_user.shape[0]))
    return (draws[:, None] >= cdf[:, :-1]).sum(axis=1)


def session_context(
    context: UserContext,
    session_user: np.ndarray,
    session_timestamp: np.ndarray,
    device: np.ndarray,
    locales: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """[S] users, timestamps and devices -> context name -> [S] int64 ids (hour, weekday,
    device, locale)."""
    sessions = session_user.shape[0]
    travel = rng.random(sessions) < _TRAVEL_PROBABILITY
    locale = np.where(
        travel, rng.integers(locales, size=sessions), context.home_locale[session_user]
    )
    return {
        **time_context(session_timestamp),
        DEVICE: device.astype(np.int64),
        LOCALE: locale.astype(np.int64),
    }
