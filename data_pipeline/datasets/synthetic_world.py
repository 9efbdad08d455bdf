"""The hidden truth of a synthetic world: latent factors, popularity and observable features.

Items are drawn around ``C`` category centers in a ``d``-dimensional latent space; users are drawn
around the same centers (tastes) with more spread. True relevance of a pair is
``u · v + item_bias``. Observable features are noisy functions of the factors, so a model can
learn from them, but never exactly recover the factors:

* item ``category``: argmax of the item vector's projection onto the C centers (k-means-like);
* item ``brand``: a sub-cluster inside the category, replaced by a random brand 30% of the time;
* user ``segment``: argmax of the user vector's projection onto random directions;
* user ``region``: like segment but with heavy noise (weakly informative);
* user ``age_bucket``: quantile bucket of a noisy linear read-out of the user vector.

Item popularity (how often the logging system samples an item as a candidate) is Zipf-like over a
random permutation of item ids, and item bias grows with log popularity: popular items are more
clickable, which is the popularity bias a retrieval model has to correct for.

Item promotion (off by default): a per-item business boost ``N(0, promotion_std)``, independent of
the factors and of relevance, that the logging ranker adds to its ordering key. It moves items up
or down the feed for reasons a click model cannot see, so examination inflates the raw click rate
of promoted items; drawn from its own stream, so turning it on leaves every other draw unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

WORLD_STREAM = 1
LAUNCH_STREAM = 3
PROMOTION_STREAM = 2


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the hidden world and of the logging system.

    Args:
        categories: item categories C (also the number of taste clusters).
        brands_per_category: brands inside each category.
        segments, regions, age_buckets: user feature cardinalities.
        item_zipf_exponent: popularity of the item of popularity rank r is ``∝ r^-exponent``.
        user_zipf_exponent: same for how often a user starts a session.
        affinity_std: target standard deviation of ``u · v`` over random pairs.
        bias_mean: mean item bias (sets the overall click rate).
        positions: feed slots P per session; ``position`` is in ``[0, P)``.
        candidates_per_session: K popularity-sampled candidates the logged ranker orders.
        ranker_noise_std: noise of the logged ranker's relevance estimate.
        promotion_std: spread of the per-item promotion boost the logging ranker adds to its
            ordering key (not to the logged ``ranker_score``); 0 = no promotion.
        shuffled_fraction: share of sessions whose P shown items (the ranker's top P) are shown in
            a uniformly random order (randomized top-P, as in position-bias experiments).
        examination_power: P(examine position p) = ``1 / (1 + p)^power``.
        like_offset: P(like | click) = sigmoid(relevance + like_offset).
        long_view_offset: P(long_view | click) = sigmoid(u · v + long_view_offset); no item bias,
            so long views reward true affinity, not clickable popular items.
        session_interval_s: seconds between consecutive sessions (timestamps are exact).
        start_timestamp: timestamp of the first session.
        new_item_fraction: share of items that launch during the feed instead of before it
            (cold-start items); 0 = the whole catalog exists from the start.
        new_item_window: new items launch uniformly over the last ``new_item_window`` of the
            feed's sessions; before its launch an item is never a candidate.
    """

    categories: int = 20
    brands_per_category: int = 8
    segments: int = 8
    regions: int = 16
    age_buckets: int = 6
    item_zipf_exponent: float = 1.0
    user_zipf_exponent: float = 0.5
    affinity_std: float = 1.0
    bias_mean: float = -3.5
    positions: int = 10
    candidates_per_session: int = 30
    ranker_noise_std: float = 1.0
    promotion_std: float = 0.0
    shuffled_fraction: float = 0.0
    examination_power: float = 0.7
    like_offset: float = -1.0
    long_view_offset: float = -1.0
    session_interval_s: int = 10
    start_timestamp: int = 1_600_000_000
    new_item_fraction: float = 0.0
    new_item_window: float = 0.3

    def __post_init__(self) -> None:
        if self.candidates_per_session < self.positions:
            raise ValueError(
                f"candidates_per_session={self.candidates_per_session} must be >= "
                f"positions={self.positions}"
            )
        if self.promotion_std < 0 or not 0 <= self.shuffled_fraction <= 1:
            raise ValueError(
                f"promotion_std={self.promotion_std} must be >= 0 and "
                f"shuffled_fraction={self.shuffled_fraction} in [0, 1]"
            )
        if not 0 <= self.new_item_fraction < 1 or not 0 < self.new_item_window <= 1:
            raise ValueError(
                f"new_item_fraction={self.new_item_fraction} must be in [0, 1) and "
                f"new_item_window={self.new_item_window} in (0, 1]"
            )

    def to_json(self) -> dict[str, float | int]:
        """The knobs, for the manifest; logging-policy knobs left off are omitted, so manifests
        of worlds without them stay byte-identical to those written before the knobs existed."""
        knobs = asdict(self)
        for name in ("promotion_std", "shuffled_fraction", "new_item_fraction"):
            if knobs[name] == 0:
                del knobs[name]
        if "new_item_fraction" not in knobs:
            del knobs["new_item_window"]
        return knobs


@dataclass(frozen=True)
class SyntheticWorld:
    """Args:
    user_factors: [N, d] float32.
    item_factors: [M, d] float32.
    item_bias: [M] float32.
    item_promotion: [M] float32 boost added to the logging ranker's ordering key (zeros when off).
    item_popularity: [M] float64 candidate-sampling probability (sums to 1).
    item_popularity_cdf: [M] float64 cumulative of ``item_popularity``.
    item_launch: [M] float64 launch point of each item as a fraction of the feed's sessions in
        ``[0, 1)`` (0: in the catalog from the start).
    user_activity_cdf: [N] float64 cumulative session-start probability.
    user_features: name -> [N] int64 ids (segment, region, age_bucket).
    item_features: name -> [M] int64 ids (category, brand).
    table_sizes: feature name -> cardinality.
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    item_promotion: np.ndarray
    item_popularity: np.ndarray
    item_popularity_cdf: np.ndarray
    user_activity_cdf: np.ndarray
    item_launch: np.ndarray
    user_features: dict[str, np.ndarray]
    item_features: dict[str, np.ndarray]
    table_sizes: dict[str, int]


def zipf_probabilities(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """[n] probabilities ``∝ rank^-exponent``, ranks assigned to ids by a random permutation."""
    by_rank = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    probabilities = np.empty(n, dtype=np.float64)
    probabilities[rng.permutation(n)] = by_rank / by_rank.sum()
    return probabilities


def sample_from_cdf(cdf: np.ndarray, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw ids with probabilities given by ``cdf`` ([n] cumulative); returns int64 ``size``."""
    draws = rng.random(size) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, draws, side="right"), cdf.shape[0] - 1).astype(np.int64)


def build_world(users: int, items: int, dim: int, seed: int, config: WorldConfig) -> SyntheticWorld:
    """Draw the world for ``seed`` (independent of the feed's per-chunk streams)."""
    rng = np.random.default_rng([seed, WORLD_STREAM])
    centers = rng.normal(size=(config.categories, dim))
    item_cluster = rng.integers(config.categories, size=items)
    item_factors = centers[item_cluster] + 0.6 * rng.normal(size=(items, dim))
    user_cluster = rng.integers(config.categories, size=users)
    user_factors = 0.7 * centers[user_cluster] + 0.9 * rng.normal(size=(users, dim))
    # Rescale both sides so that u · v over random pairs has the configured spread.
    probe_u = user_factors[rng.integers(users, size=4096)]
    probe_v = item_factors[rng.integers(items, size=4096)]
    scale = np.sqrt(config.affinity_std / np.std(np.sum(probe_u * probe_v, axis=1)))
    user_factors, item_factors = user_factors * scale, item_factors * scale

    item_popularity = zipf_probabilities(items, config.item_zipf_exponent, rng)
    log_popularity = np.log(item_popularity)
    standardized = (log_popularity - log_popularity.mean()) / (log_popularity.std() + 1e-12)
    item_bias = config.bias_mean + 0.5 * standardized + 0.5 * rng.normal(size=items)
    user_activity = zipf_probabilities(users, config.user_zipf_exponent, rng)

    item_features = _item_features(item_factors, centers * scale, config, rng)
    user_features = _user_features(user_factors, config, rng)
    promotion_rng = np.random.default_rng([seed, PROMOTION_STREAM])
    item_promotion = config.promotion_std * promotion_rng.standard_normal(items)
    return SyntheticWorld(
        item_launch=_item_launch(items, seed, config),
        user_factors=user_factors.astype(np.float32),
        item_factors=item_factors.astype(np.float32),
        item_bias=item_bias.astype(np.float32),
        item_promotion=item_promotion.astype(np.float32),
        item_popularity=item_popularity,
        item_popularity_cdf=np.cumsum(item_popularity),
        user_activity_cdf=np.cumsum(user_activity),
        user_features=user_features,
        item_features=item_features,
        table_sizes={
            "user_id": users,
            "item_id": items,
            "segment": config.segments,
            "region": config.regions,
            "age_bucket": config.age_buckets,
            "category": config.categories,
            "brand": config.categories * config.brands_per_category,
        },
    )


def _item_launch(items: int, seed: int, config: WorldConfig) -> np.ndarray:
    """[M] launch fractions: ``new_item_fraction`` of the items (at random) launch uniformly in
    ``[1 - new_item_window, 1)``; the rest at 0. Own stream, so other draws do not move."""
    launch = np.zeros(items, dtype=np.float64)
    if config.new_item_fraction <= 0:
        return launch
    rng = np.random.default_rng([seed, LAUNCH_STREAM])
    new = rng.random(items) < config.new_item_fraction
    launch[new] = 1.0 - config.new_item_window * rng.random(int(new.sum()))
    return launch


def _item_features(
    item_factors: np.ndarray, centers: np.ndarray, config: WorldConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    items, dim = item_factors.shape
    category = np.argmax(item_factors @ centers.T, axis=1)
    brand_directions = rng.normal(size=(config.categories, config.brands_per_category, dim))
    brand_scores = np.einsum("md,mbd->mb", item_factors, brand_directions[category])
    brand = category * config.brands_per_category + np.argmax(brand_scores, axis=1)
    random_brand = rng.integers(config.categories * config.brands_per_category, size=items)
    brand = np.where(rng.random(items) < 0.3, random_brand, brand)
    return {"category": category.astype(np.int64), "brand": brand.astype(np.int64)}


def _user_features(
    user_factors: np.ndarray, config: WorldConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    users, dim = user_factors.shape
    unit = user_factors / (np.linalg.norm(user_factors, axis=1, keepdims=True) + 1e-12)
    segment = np.argmax(unit @ rng.normal(size=(dim, config.segments)), axis=1)
    region_scores = unit @ rng.normal(size=(dim, config.regions))
    region = np.argmax(region_scores + 1.5 * rng.normal(size=region_scores.shape), axis=1)
    age_signal = unit @ rng.normal(size=dim) + 0.5 * rng.normal(size=users)
    edges = np.quantile(age_signal, np.linspace(0, 1, config.age_buckets + 1)[1:-1])
    age_bucket = np.searchsorted(edges, age_signal, side="right")
    return {
        "segment": segment.astype(np.int64),
        "region": region.astype(np.int64),
        "age_bucket": age_bucket.astype(np.int64),
    }
