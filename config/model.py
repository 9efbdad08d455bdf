"""The ``model`` section: embedding sizes, towers, temperature, the history encoder, the
light ranking head and the debiasing heads."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from config.errors import Fail


class Combiner(enum.Enum):
    """How per-event parts (item, interaction flags, recency) merge into one vector per event.

    ``sum``: elementwise sum. ``concat_mlp``: concatenate, then Linear -> ReLU -> Linear.
    ``gated``: item plus each other part scaled by a learned per-dimension sigmoid gate.
    """

    SUM = "sum"
    CONCAT_MLP = "concat_mlp"
    GATED = "gated"


class Encoder(enum.Enum):
    """How the padded history becomes one vector: masked ``mean`` or ``self_attention``."""

    MEAN = "mean"
    SELF_ATTENTION = "self_attention"


class Summary(enum.Enum):
    """How self-attention outputs become one vector.

    ``newest_and_mean``: concat[output of the newest event, masked mean of outputs] (2 * D).
    ``attention_pooling``: a learned query attends over the outputs (D).
    ``newest``: the output of the newest event alone (D); with causal attention it is a function
    of the sequence up to that event, so packed sequence training can read it at every position.
    """

    NEWEST_AND_MEAN = "newest_and_mean"
    ATTENTION_POOLING = "attention_pooling"
    NEWEST = "newest"


class Positions(enum.Enum):
    """Position (recency rank) encodings: ``learned`` embedding table or fixed ``sinusoidal``
    added to the events, or ``relative``: a learned bias per head and distance in events between
    query and key added to the attention logits (the recency rank seen from each query, which
    packed sequence training needs)."""

    LEARNED = "learned"
    SINUSOIDAL = "sinusoidal"
    RELATIVE = "relative"


class DebiasMode(enum.Enum):
    """How an estimate leaves the weight.

    ``divide``: ``w / max(estimate, min_estimate)`` (inverse propensity, scale-free).
    ``subtract``: ``max(w - estimate, 0)`` (value above what the factor predicts).
    Both are then clamped to ``max_weight``.
    """

    DIVIDE = "divide"
    SUBTRACT = "subtract"


@dataclass
class HistoryConfig:
    """The user-history encoder. Off: ``hist_item_ids`` is mean-pooled as one bag by the
    EmbeddingBagCollection. On: every history event's item embedding (from the same sharded
    ``item_id`` table, now in an EmbeddingCollection), one embedding per action flag and a
    recency embedding are combined per event and encoded (``models/history.py``)."""

    enabled: bool = False
    encoder: Encoder = Encoder.SELF_ATTENTION
    combiner: Combiner = Combiner.SUM
    # Log-scale buckets of the time since each history event (0: no recency embedding).
    recency_buckets: int = 16
    max_length: int = 50
    num_layers: int = 2
    num_heads: int = 2
    # Attention and residual dropout; 0 keeps CPU self-attention on the fused SDPA kernel.
    dropout: float = 0.0
    positions: Positions = Positions.LEARNED
    summary: Summary = Summary.NEWEST_AND_MEAN
    # Each event attends only to itself and older events (SASRec's causal attention).
    causal: bool = False
    # Sequence mode: a training example is one window of the user's newest ``max_length``
    # events; one causal pass gives the user vector at every position and each position
    # predicts the next event (needs causal, positions=relative, summary=newest).
    packed: bool = False


@dataclass
class LightHeadConfig:
    """The light ranking head inside retrieval (``models/light_ranker.py``): the user tower also
    emits ``num_embeddings`` ranker embeddings; per candidate item, target-aware attention over
    them, then [item, attended user, per-embedding scores, retrieval score] -> MLP -> one logit
    per label, trained with BCE (weight ``loss_weight``) on the logged row's labels plus
    ``negatives_per_row`` other in-batch items labelled 0. Evaluation also reports the list
    reranked by the head's net user value: ``num_knn_items`` retrieved, ``num_items`` kept."""

    enabled: bool = False
    num_embeddings: int = 4
    hidden: list[int] = field(default_factory=lambda: [64])
    loss_weight: float = 1.0
    negatives_per_row: int = 4
    num_knn_items: int = 100
    num_items: int = 20


@dataclass
class DebiasPartConfig:
    """One debiasing part: an estimate of the row weight from one factor, trained by MSE on its
    own gradient path, removed from the weight by ``mode`` (``divide``: ``w / max(estimate,
    min_estimate)``; ``subtract``: ``max(w - estimate, 0)``), then clamped to ``max_weight``."""

    enabled: bool = False
    mode: DebiasMode = DebiasMode.DIVIDE
    min_estimate: float = 0.01
    max_weight: float = 50.0


@dataclass
class PositionDebiasConfig(DebiasPartConfig):
    """E[NUV | position]: positions 0 .. buckets-2 get their own scalar, deeper ones share the
    last; unknown positions (-1) have one more bucket of their own. ``learning_rate_scale``
    multiplies the head's effective (Adam) learning rate over the dense rate, so it converges
    within a short run."""

    buckets: int = 20
    learning_rate_scale: float = 1.0


@dataclass
class UserDebiasConfig(DebiasPartConfig):
    """E[weight | user] from the detached user-tower output (MLP with one hidden layer)."""

    hidden_dim: int = 32


@dataclass
class DebiasConfig:
    """Debiased example weights (``models/debias.py``): position first, then user."""

    position: PositionDebiasConfig = field(default_factory=PositionDebiasConfig)
    user: UserDebiasConfig = field(default_factory=UserDebiasConfig)


@dataclass
class ModelConfig:
    embedding_dim: int = 64
    # Per-table embedding dimension overrides, e.g. {item_id: 128}.
    table_dims: dict[str, int] = field(default_factory=dict)
    user_mlp: list[int] = field(default_factory=lambda: [256, 128])
    item_mlp: list[int] = field(default_factory=lambda: [256, 128])
    output_dim: int = 64
    temperature: float = 0.05
    # A learned temperature starts at ``temperature`` and is clamped to ``temperature_range``.
    learn_temperature: bool = False
    temperature_range: list[float] = field(default_factory=lambda: [0.01, 1.0])
    l2_normalize: bool = True
    history: HistoryConfig = field(default_factory=HistoryConfig)
    light_head: LightHeadConfig = field(default_factory=LightHeadConfig)
    debias: DebiasConfig = field(default_factory=DebiasConfig)


def validate_model(model: ModelConfig, fail: Fail) -> None:
    if model.temperature <= 0:
        fail("model.temperature", "must be > 0")
    validate_temperature(model, fail)
    validate_debias(model.debias, fail)


def validate_temperature(model: ModelConfig, fail: Fail) -> None:
    low_high = model.temperature_range
    if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
        fail(
            "model.temperature_range", f"expected [low, high] with 0 < low <= high, got {low_high}"
        )
    if model.learn_temperature and not low_high[0] <= model.temperature <= low_high[1]:
        fail(
            "model.temperature",
            f"a learned temperature starts inside model.temperature_range {low_high}",
        )


def validate_debias(debias: DebiasConfig, fail: Fail) -> None:
    parts: tuple[tuple[str, DebiasPartConfig], ...] = (
        ("position", debias.position),
        ("user", debias.user),
    )
    for name, part in parts:
        if not part.enabled:
            continue
        if part.min_estimate <= 0:
            fail(f"model.debias.{name}.min_estimate", "must be > 0 (the divisor's floor)")
        if part.max_weight <= 0:
            fail(f"model.debias.{name}.max_weight", "must be > 0")
    if debias.position.enabled and debias.position.buckets < 1:
        fail("model.debias.position.buckets", "must be >= 1")
    if debias.position.learning_rate_scale <= 0:
        fail("model.debias.position.learning_rate_scale", "must be > 0")
    if debias.user.enabled and debias.user.hidden_dim < 1:
        fail("model.debias.user.hidden_dim", "must be >= 1")
