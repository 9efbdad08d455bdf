"""Topics of a synthetic world: item titles, user topic affinities and search-query words, all
tied to the latent factors.

T topics are random unit directions in the d-dimensional latent space. An item's topic mixture is
``softmax(temperature · cos(v, topic_t))`` over t, a user's topic affinity the same of ``u``, so
users and items that score high together (``u · v``) tend to favour the same topics.

Words are pronounceable strings (three consonant-vowel syllables, ``"zorami"``), all distinct:
every topic owns ``words_per_topic`` of them, and ``filler_words`` more are shared by all topics
(like "the", "new", "best"); words are drawn Zipf-like within their topic or the fillers. A title has between ``title_words[0]`` and
``title_words[1]`` words; each is a filler with probability ``filler_fraction``, otherwise a word of
a topic drawn from the item's mixture. A search query has 1 to ``query_words`` words, each from a
topic drawn from the user's affinity (no fillers). Words are lowercase letters only, so
:func:`data_pipeline.text.tokenize` gives them back unchanged and :class:`WordHasher` can hash word
indices without building strings.

The observable ``user_topic_affinity`` feature is the user's top-k topics by a noisy affinity
(``affinity × exp(N(0, affinity_noise_std))``), weighted by those noisy values.

Everything is drawn from ``default_rng([seed, TOPIC_STREAM])``, apart from the world's other
streams, so turning the topics on changes no other draw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.datasets.history import jagged_offsets
from data_pipeline.text import TextHashConfig, bigram_id, unigram_id

TOPIC_STREAM = 3
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES_PER_WORD = 3
# Word frequencies inside a topic and among fillers, as in natural text.
_ZIPF_EXPONENT = 1.0


@dataclass(frozen=True)
class TopicConfig:
    """Knobs of topics, titles and queries.

    Args:
        topics: T, also the rows of the ``topic`` table.
        words_per_topic: W words owned by each topic.
        filler_words: F words shared by all topics.
        title_words: (min, max) words per item title, both inclusive.
        filler_fraction: probability that a title word is a filler.
        temperature: sharpness of the softmax over topic cosines (higher: fewer topics per item).
        query_words: most words per search query (at least 1).
        affinity_top_k: topics listed in ``user_topic_affinity``.
        affinity_noise_std: log-normal noise of the observed affinity weights.
    """

    topics: int = 16
    words_per_topic: int = 40
    filler_words: int = 60
    title_words: tuple[int, int] = (4, 8)
    filler_fraction: float = 0.3
    temperature: float = 8.0
    query_words: int = 3
    affinity_top_k: int = 3
    affinity_noise_std: float = 0.3

    def __post_init__(self) -> None:
        low, high = self.title_words
        if min(self.topics, self.words_per_topic, self.filler_words, self.query_words) < 1:
            raise ValueError(
                "topics, words_per_topic, filler_words and query_words must be >= 1; got "
                f"{self.topics}, {self.words_per_topic}, {self.filler_words}, {self.query_words}"
            )
        if not 1 <= low <= high or not 0 <= self.filler_fraction < 1:
            raise ValueError(
                f"title_words={self.title_words} must be 1 <= min <= max and "
                f"filler_fraction={self.filler_fraction} in [0, 1)"
            )
        if not 1 <= self.affinity_top_k <= self.topics:
            raise ValueError(f"affinity_top_k={self.affinity_top_k} must be in [1, topics]")

    @property
    def vocabulary_size(self) -> int:
        return self.topics * self.words_per_topic + self.filler_words

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = asdict(self)
        data["title_words"] = list(self.title_words)
        return data


@dataclass(frozen=True)
class TopicWorld:
    """Args:
    words: [V] distinct lowercase words; topic t owns ``t*W .. t*W + W - 1``, fillers follow.
    directions: [T, d] float32 unit topic directions.
    item_topics: [M, T] float32 topic mixture of each item (rows sum to 1).
    user_topics: [N, T] float32 topic affinity of each user (rows sum to 1).
    title_words: [M, L] int32 word indices of each title, -1 padded (L = title_words[1]).
    affinity_ids: [N, k] int64 the user's top-k topics by noisy affinity, strongest first.
    affinity_weights: [N, k] float32 the noisy affinities of ``affinity_ids``.
    """

    words: np.ndarray
    directions: np.ndarray
    item_topics: np.ndarray
    user_topics: np.ndarray
    title_words: np.ndarray
    affinity_ids: np.ndarray
    affinity_weights: np.ndarray

    def titles(self) -> pa.Array:
        """[M] string: each title's words joined by spaces."""
        return join_words(self.words, self.title_words)

    def affinity_arrow(self) -> tuple[pa.ListArray, pa.ListArray]:
        """``user_topic_affinity`` ids and weights, [N] lists of k values each."""
        users, k = self.affinity_ids.shape
        offsets = pa.array(np.arange(0, users * k + 1, k, dtype=np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(self.affinity_ids.reshape(-1)))
        weights = pa.ListArray.from_arrays(offsets, pa.array(self.affinity_weights.reshape(-1)))
        return ids, weights


def make_words(count: int, rng: np.random.Generator) -> np.ndarray:
    """[count] distinct pronounceable lowercase words of three consonant-vowel syllables."""
    syllables = np.array([c + v for c in _CONSONANTS for v in _VOWELS])
    space = len(syllables) ** _SYLLABLES_PER_WORD
    if count > space:
        raise ValueError(f"at most {space} distinct words, asked for {count}")
    codes = rng.choice(space, size=count, replace=False)
    digits = [(codes // len(syllables) ** i) % len(syllables) for i in range(_SYLLABLES_PER_WORD)]
    words = syllables[digits[0]]
    for digit in digits[1:]:
        words = np.char.add(words, syllables[digit])
    return words.astype(object)


def sample_rows(probabilities: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One categorical draw per uniform, from its row's distribution.

    Args:
        probabilities: [R, T] rows of non-negative weights (each row sums to 1).
        uniforms: [R, L] draws in [0, 1).
    Returns:
        [R, L] int64 category indices in [0, T).
    """
    rows, categories = probabilities.shape
    cdf = np.cumsum(probabilities, axis=1)
    cdf /= cdf[:, -1:]
    # Row r's cdf shifted by r: one searchsorted over the concatenation serves every row.
    shifted = (cdf + np.arange(rows)[:, None]).reshape(-1)
    targets = uniforms + np.arange(rows)[:, None]
    found = np.searchsorted(shifted, targets.reshape(-1), side="right").reshape(uniforms.shape)
    return np.minimum(found - np.arange(rows)[:, None] * categories, categories - 1)


def zipf_draws(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``shape`` int64 ranks in [0, n), rank r drawn with probability ``∝ (r + 1)^-1``."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -_ZIPF_EXPONENT
    cdf = np.cumsum(weights / weights.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), n - 1)


def softmax_cosines(factors: np.ndarray, directions: np.ndarray, temperature: float) -> np.ndarray:
    """[R, d] factors, [T, d] unit directions -> [R, T] float32 softmax of scaled cosines."""
    unit = factors / (np.linalg.norm(factors, axis=1, keepdims=True) + 1e-12)
    logits = temperature * (unit @ directions.T)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def build_topics(
    user_factors: np.ndarray, item_factors: np.ndarray, config: TopicConfig, seed: int
) -> TopicWorld:
    """Draw topics, words, titles and affinities for the world's factors ([N, d] and [M, d])."""
    rng = np.random.default_rng([seed, TOPIC_STREAM])
    dim = item_factors.shape[1]
    directions = rng.normal(size=(config.topics, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    words = make_words(config.vocabulary_size, rng)
    item_topics = softmax_cosines(item_factors, directions, config.temperature)
    user_topics = softmax_cosines(user_factors, directions, config.temperature)
    noisy = user_topics * np.exp(config.affinity_noise_std * rng.standard_normal(user_topics.shape))
    top = np.argsort(-noisy, axis=1, kind="stable")[:, : config.affinity_top_k]
    return TopicWorld(
        words=words,
        directions=directions.astype(np.float32),
        item_topics=item_topics,
        user_topics=user_topics,
        title_words=_draw_titles(item_topics, config, rng),
        affinity_ids=top.astype(np.int64),
        affinity_weights=np.take_along_axis(noisy, top, axis=1).astype(np.float32),
    )


def _draw_titles(
    item_topics: np.ndarray, config: TopicConfig, rng: np.random.Generator
) -> np.ndarray:
    """[M, T] mixtures -> [M, L] int32 title word indices, -1 padded."""
    items = item_topics.shape[0]
    low, high = config.title_words
    lengths = np.asarray(rng.integers(low, high + 1, size=items))
    topic = sample_rows(item_topics, rng.random((items, high)))
    topic_word = topic * config.words_per_topic + zipf_draws(
        config.words_per_topic, (items, high), rng
    )
    filler_word = config.topics * config.words_per_topic + zipf_draws(
        config.filler_words, (items, high), rng
    )
    words = np.where(rng.random((items, high)) < config.filler_fraction, filler_word, topic_word)
    return np.where(np.arange(high) < lengths[:, None], words, -1).astype(np.int32)


def draw_query_words(
    topics: TopicWorld, users: np.ndarray, config: TopicConfig, rng: np.random.Generator
) -> np.ndarray:
    """[Q] user ids -> [Q, query_words] int32 word indices (-1 padded) of one query each, every
    word from a topic drawn from the user's affinity."""
    count = users.shape[0]
    width = config.query_words
    lengths = np.asarray(rng.integers(1, width + 1, size=count))
    topic = sample_rows(topics.user_topics[users].astype(np.float64), rng.random((count, width)))
    words = topic * config.words_per_topic + zipf_draws(config.words_per_topic, (count, width), rng)
    return np.where(np.arange(width) < lengths[:, None], words, -1).astype(np.int32)


def join_words(vocabulary: np.ndarray, word_indices: np.ndarray) -> pa.Array:
    """[V] words and [R, L] indices (-1 padded) -> [R] strings, words joined by single spaces."""
    table = pa.array(list(vocabulary), pa.string())
    columns = [
        table.take(pa.array(column, mask=column < 0)) for column in word_indices.T.astype(np.int64)
    ]
    return pc.binary_join_element_wise(*columns, " ", null_handling="skip")


class WordHasher:
    """Hashed text ids of word-index rows, equal to :func:`data_pipeline.text.text_ids` of the
    joined words, without building strings: unigram ids come from a ``[V]`` table, bigram ids from
    a cache filled per distinct word pair (at most ``V^2`` hashes over a whole run)."""

    def __init__(self, vocabulary: np.ndarray, config: TextHashConfig) -> None:
        self.vocabulary = vocabulary
        self.config = config
        size = len(vocabulary)
        self.unigrams = np.array([unigram_id(w, config.vocab_size) for w in vocabulary], np.int64)
        self._pair_keys = np.zeros(0, dtype=np.int64)
        self._pair_ids = np.zeros(0, dtype=np.int64)
        self._size = size

    def _bigram_ids(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        keys = first.astype(np.int64) * self._size + second
        missing = np.setdiff1d(np.unique(keys), self._pair_keys, assume_unique=True)
        if len(missing):
            words = self.vocabulary
            new_ids = np.array(
                [
                    bigram_id(words[k // self._size], words[k % self._size], self.config.vocab_size)
                    for k in missing
                ],
                dtype=np.int64,
            )
            keys_all = np.concatenate([self._pair_keys, missing])
            order = np.argsort(keys_all)
            self._pair_keys = keys_all[order]
            self._pair_ids = np.concatenate([self._pair_ids, new_ids])[order]
        return self._pair_ids[np.searchsorted(self._pair_keys, keys)]

    def ids(self, word_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[R, L] word indices (-1 padded, words first) -> (``[R]`` int64 id counts, ``[sum]``
        int64 ids: each row's unigrams in order, then its bigrams in order)."""
        words = word_indices[:, : self.config.max_tokens].astype(np.int64)
        present = words >= 0
        unigram = np.where(present, self.unigrams[np.maximum(words, 0)], 0)
        parts, masks = [unigram], [present]
        if self.config.bigrams and words.shape[1] > 1:
            pair = present[:, 1:]
            bigram = np.zeros(pair.shape, dtype=np.int64)
            bigram[pair] = self._bigram_ids(words[:, :-1][pair], words[:, 1:][pair])
            parts.append(bigram)
            masks.append(pair)
        values = np.concatenate(parts, axis=1)
        mask = np.concatenate(masks, axis=1)
        counts = mask.sum(axis=1).astype(np.int64)
        return counts, values[mask]

    def list_array(self, word_indices: np.ndarray) -> pa.ListArray:
        """[R, L] word indices -> [R] list<int64> of hashed ids."""
        counts, values = self.ids(word_indices)
        return pa.ListArray.from_arrays(pa.array(jagged_offsets(counts)), pa.array(values))
