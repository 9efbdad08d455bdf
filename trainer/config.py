"""Typed configuration: dataclasses validated by OmegaConf when a YAML file loads.

Unknown keys, wrong types and invalid enum values are errors that name the key
(``data.batch_size``); ``a.b=c`` overrides from the command line go through the same checks.
Runtime objects (process groups, devices) never live here; they are passed to ``build`` calls.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.alignment import AlignmentMethod
from models.debias import DebiasMode
from models.history import Combiner, Encoder, Positions, Summary
from trainer.feature_config import FeaturesConfig, IdPolicy, validate_features


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class ShardingType(enum.Enum):
    """TorchRec sharding types the planner may choose from (row_wise needs a GPU)."""

    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    TABLE_COLUMN_WISE = "table_column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"
    DATA_PARALLEL = "data_parallel"


class LossFamily(enum.Enum):
    """How a row's positive is scored against its negatives (see ``models.losses``).

    ``softmax``: listwise softmax over every candidate (in-batch plus every extra negative).
    ``sampled_softmax``: listwise softmax over 1 positive + ``loss.negatives_per_row`` negatives.
    ``sigmoid``: pointwise binary cross entropy (positive 1, negatives 0).
    ``cosine``: pointwise regression of cosines to +1 / -1 at ratio 1:``negatives_per_row``.
    ``triplet``: pairwise hinge with ``loss.margin``.
    ``bpr``: pairwise logistic (triplet logistic / BPR).
    """

    SOFTMAX = "softmax"
    SAMPLED_SOFTMAX = "sampled_softmax"
    SIGMOID = "sigmoid"
    COSINE = "cosine"
    TRIPLET = "triplet"
    BPR = "bpr"


class CorpusDistribution(enum.Enum):
    """Distribution of negatives drawn from the item corpus."""

    UNIFORM = "uniform"
    UNIGRAM = "unigram"


class ExcludeRule(enum.Enum):
    """Items an evaluation query may not be recommended (``trainer.exclusion``); never
    depends on the query's target."""

    ENGAGED = "engaged"  # earlier events with positive net user value
    ALL_SHOWN = "all_shown"  # every earlier event, impressions included
    NONE = "none"  # nothing: repeat consumption is allowed


class NonFinitePolicy(enum.Enum):
    """What a step with a NaN or infinite loss does (decided collectively, before backward)."""

    SKIP = "skip"  # no update on any rank; counted, the batch saved under <run>/bad_batches
    HALT = "halt"  # save the batch, then stop with an error


class SparseOptimizer(enum.Enum):
    """Fused (in-backward) optimizers for embedding tables."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAGRAD = "adagrad"
    SGD = "sgd"
    ADAM = "adam"


@dataclass
class DataConfig:
    path: str = "data/ml-100k"
    train_split: str = "train"
    batch_size: int = 512
    eval_batch_size: int = 2048
    num_workers: int = 1
    # Rows are shuffled inside windows of this many row groups (resumable without saving rows).
    shuffle_window_row_groups: int = 4
    shuffle: bool = True
    id_policy: IdPolicy = IdPolicy.ERROR
    # Newest history items pooled as an extra feature `hist_recent_item_ids` (0 = not derived).
    recent_history: int = 0
    verify_checksums: bool = True


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


@dataclass
class LossConfig:
    # Net user value = labels . label_weights, clamped at 0; rows with zero value give no signal.
    label_weights: dict[str, float] = field(default_factory=lambda: {"click": 1.0})
    mask_accidental_hits: bool = True
    # Negatives from every rank's batch (differentiable all-gather), not only this rank's.
    global_negatives: bool = False
    family: LossFamily = LossFamily.SOFTMAX
    # Negatives per row for sampled_softmax / pointwise / pairwise (drawn from the row's
    # candidates); null uses every candidate. ``cosine`` needs it (the 1:k ratio).
    negatives_per_row: int | None = None
    margin: float = 0.2


@dataclass
class LogQConfig:
    """Sampling-bias correction (Yi et al. 2019): every logit, the positive's included, gets
    ``- log`` of its item's expected count in the whole shared candidate set, summed over its
    sources: ``(C_in + C_mem) * p_data(j) + S * p_corpus(j)`` for C_in in-batch rows, C_mem
    memory entries and S corpus samples. ``p_data`` (per row, uncapped, so a head item can
    expect many copies) comes from a streaming, rank-synchronized count-min sketch of
    ``num_hashes`` x ``hash_size`` decayed counts, ``alpha`` the decay per step; ``p_corpus``
    is the corpus sampler's known probability."""

    enabled: bool = False
    hash_size: int = 1 << 20
    num_hashes: int = 2
    alpha: float = 0.01


@dataclass
class MixedNegativesConfig:
    """Mixed negative sampling (Yang et al. 2020): ``num_samples`` corpus items per step shared by
    the batch, run through the item tower with their real features. With logQ correction on,
    every candidate's logit gets ``- log`` of its item's expected count in the whole candidate
    set, in which the samples count ``num_samples * p(item)`` (``LogQConfig``)."""

    num_samples: int = 0
    distribution: CorpusDistribution = CorpusDistribution.UNIGRAM
    alpha: float = 0.75


@dataclass
class MemoryConfig:
    """Cross-batch memory: a FIFO of recent in-batch item embeddings (detached, duplicates
    kept) reused as negatives. For losses of score differences each memory column's item
    gradient goes to the row's positive, so the item tower still learns from a balanced
    softmax; with logQ on, entries share the in-batch items' mixture correction."""

    size: int = 0
    warmup_steps: int = 100
    max_staleness_steps: int = 50


@dataclass
class HardNegativesConfig:
    """Row-specific hard negatives. ``per_row`` is their share (how many per positive row);
    ``weight`` is how many ordinary negatives each counts as (log-weight in the softmax)."""

    per_row: int = 0
    weight: float = 1.0


@dataclass
class MinedNegativesConfig(HardNegativesConfig):
    """Semi-hard negatives from the model's own top-K over the corpus, skipping the top few
    (Facebook EBR), mined against corpus embeddings refreshed every ``refresh_every_steps``."""

    top_k: int = 100
    skip_top: int = 10
    refresh_every_steps: int = 200


@dataclass
class NegativesConfig:
    log_q: LogQConfig = field(default_factory=LogQConfig)
    mixed: MixedNegativesConfig = field(default_factory=MixedNegativesConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Items shown to the same user in the same request and not engaged (needs the data column).
    impressions: HardNegativesConfig = field(default_factory=HardNegativesConfig)
    mined: MinedNegativesConfig = field(default_factory=MinedNegativesConfig)


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    sparse_optimizer: SparseOptimizer = SparseOptimizer.ROWWISE_ADAGRAD
    sparse_lr: float = 0.05
    log_every_steps: int = 20
    progress_bar: bool = True
    non_finite_loss: NonFinitePolicy = NonFinitePolicy.SKIP
    # Halt once this many steps were skipped for a non-finite loss (a broken run, not a bad row).
    max_skipped_steps: int = 100


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run.dir>/checkpoints/step-N`` (see ``trainer.checkpoint``).

    ``every_n_steps`` null saves only at the end (and on a signal). ``resume`` picks up the
    latest complete checkpoint of ``run.dir`` automatically. ``signals`` are caught: every rank
    finishes its step, the job saves and stops (exit 128 + signal number).
    """

    every_n_steps: int | None = None
    keep_last: int = 2
    resume: bool = True
    # Start from this checkpoint folder (or a run directory's latest) when run.dir has none:
    # warm starts, or continuing a run on another world size.
    resume_from: str | None = None
    async_save: bool = False
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class ShardingConfig:
    sharding_types: list[ShardingType] = field(
        default_factory=lambda: [ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE]
    )


@dataclass
class FunnelConfig:
    """Funnel consistency against a ranker (``trainer.funnel``): off while ``ranker`` is null.

    ``ranker``: a ranker run directory or checkpoint; ``ks``: overlap / NDCG cutoffs K;
    ``retrieve_n``: N, how many items retrieval passes on; ``max_queries``: eval rows scored
    against the whole corpus (a fixed sample)."""

    ranker: str | None = None
    ks: list[int] = field(default_factory=lambda: [10, 50])
    retrieve_n: int = 100
    max_queries: int = 1000


@dataclass
class EarlyStoppingConfig:
    """Which validation metric picks the best checkpoint, and when training stops for want of
    progress: after ``patience`` validations in a row without a gain above ``min_delta``
    (null: never early; the best checkpoint is kept all the same)."""

    metric: str = "ndcg@10"
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class EvalConfig:
    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [10, 50, 100])
    # The user's earlier items excluded from every query's ranking, whatever its target.
    exclude: ExcludeRule = ExcludeRule.ENGAGED
    # Further rules the model and most-popular are also scored under (metrics.json by_exclusion).
    also_exclude: list[ExcludeRule] = field(default_factory=list)
    # Percentile bootstrap over queries (Poisson weights) behind each metric's interval.
    bootstrap_replicates: int = 1000
    interval_level: float = 0.95
    # Validation during training on ``valid_split`` every N steps and/or at each epoch's end
    # (off while both are unset); the best is kept as checkpoints/best and is what the final
    # evaluation, ``twotower eval`` and ``twotower export`` use.
    every_n_steps: int | None = None
    every_epoch: bool = False
    valid_split: str = "valid"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    at_end: bool = True
    query_chunk: int = 1024
    corpus_chunk: int = 8192
    # Cold Recall@K counts the eval rows whose target has fewer training events than this.
    cold_item_max_events: int = 5
    funnel: FunnelConfig = field(default_factory=FunnelConfig)


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "twotower"


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = "twotower"


@dataclass
class RankerConfig:
    """The ranking model (``models/ranker.py``, ``twotower train-ranker``): every user and item
    feature pooled from its own tables -> DCN-v2 low-rank cross layers -> MLP -> one logit per
    label, trained with per-label BCE. Epochs, learning rates and optimizers come from ``train``,
    NUV weights from ``loss.label_weights``."""

    embedding_dim: int = 32
    cross_layers: int = 3
    low_rank: int = 16
    mlp: list[int] = field(default_factory=lambda: [256, 128])
    # Random corpus items per logged row, paired with the row's user, every label 0 (uniform
    # over items/). Needed where every logged row is a positive (MovieLens): without them the
    # ranker never sees a pair the user did not engage with. Also applied to the eval split.
    sampled_negatives: int = 0


@dataclass
class AlignmentConfig:
    """Reward alignment (``twotower align``, ``trainer/align.py``, ``models/alignment.py``): the
    retrieval model of ``checkpoint.resume_from`` is the policy, the ranker of
    ``reward_checkpoint`` the frozen reward model (reward = its NUV), and a frozen copy of
    ``reference_checkpoint`` (null: the start checkpoint) the KL reference. Per user and step,
    ``k`` items are scored: the policy's ``top_n`` over the corpus plus ``k - top_n`` drawn from
    the corpus by ``exploration`` (unigram: training counts ** ``exploration_alpha``)."""

    reward_checkpoint: str | None = None
    reference_checkpoint: str | None = None
    k: int = 32
    top_n: int = 16
    exploration: CorpusDistribution = CorpusDistribution.UNIFORM
    exploration_alpha: float = 0.75
    # Weight of the KL(policy || reference) penalty over the sampled sets (both methods).
    kl_coefficient: float = 0.1
    # DPO's beta (method dpo): scale of the log-ratio margins in its logistic loss.
    dpo_beta: float = 1.0
    steps: int = 200
    method: AlignmentMethod = AlignmentMethod.REINFORCE
    # Dense (AdamW) and table (fused ``train.sparse_optimizer``) learning rates of the policy.
    lr: float = 1e-4
    sparse_lr: float = 0.01
    # Cutoff of the expected-ranker-reward measurement before and after alignment.
    eval_k: int = 10


@dataclass
class PointwiseDistillationConfig:
    """Logged ranker scores (the data's ``ranker_score`` column) as soft labels: BCE between
    the retrieval logit of the row's item (score / model temperature) and sigmoid(score)."""

    enabled: bool = False
    weight: float = 1.0


@dataclass
class ListwiseDistillationConfig:
    """A trained ranker (frozen) scores each row's candidates (positive, in-batch, sampled and
    hard negatives); KL between its softmax and retrieval's over the same candidates."""

    enabled: bool = False
    weight: float = 1.0
    # A ranker run directory (its latest checkpoint) or a checkpoints/step-N folder.
    teacher: str | None = None
    # Teacher logits are log(value): at 1 the teacher's distribution is proportional to value.
    teacher_temperature: float = 1.0
    # The teacher's value: a label name (its probability), or null for the expected net user
    # value under loss.label_weights.
    label: str | None = None
    # Negatives per row the teacher scores (random valid ones, plus the positive); null: all.
    # The teacher's cost is B x (1 + this) pairs per step.
    negatives_per_row: int | None = None


@dataclass
class DistillationConfig:
    """Knowledge distillation from the ranker (``models/distillation.py``); auxiliary losses
    added to the retrieval loss, each times its weight."""

    pointwise: PointwiseDistillationConfig = field(default_factory=PointwiseDistillationConfig)
    listwise: ListwiseDistillationConfig = field(default_factory=ListwiseDistillationConfig)


@dataclass
class ExperimentConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load ``path`` (YAML) over the defaults, then apply ``a.b=c`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, bad enum value or inconsistent values; the message
            names the key and the file.
    """
    source = str(path) if path is not None else "<defaults>"
    try:
        merged = OmegaConf.structured(ExperimentConfig)
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        _refuse_interpolations(merged)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        raise ConfigError(f"{source}: config key '{key}': {message}") from error
    assert isinstance(config, ExperimentConfig)
    validate(config, source)
    return config


def _refuse_interpolations(node: Any, prefix: str = "") -> None:
    """``${...}`` would read the environment (``oc.env``) or other keys at resolve time; a
    config is data, so any interpolation is an error naming its key."""
    for key in node.keys() if OmegaConf.is_dict(node) else range(len(node)):
        name = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_interpolation(node, key):
            raise ConfigError(f"config key '{name}': interpolations (${{...}}) are not allowed")
        child = node._get_node(key)
        if OmegaConf.is_config(child):
            _refuse_interpolations(child, name)


def validate(config: ExperimentConfig, source: str = "<config>") -> None:
    """Checks that span several keys or need values (not just types)."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: config key '{key}': {message}")

    if config.data.batch_size < 2:
        fail("data.batch_size", "in-batch negatives need at least 2 rows per batch")
    if config.data.num_workers < 0:
        fail("data.num_workers", "must be >= 0")
    if config.data.recent_history < 0:
        fail("data.recent_history", "must be >= 0")
    if config.data.shuffle_window_row_groups < 1:
        fail("data.shuffle_window_row_groups", "must be >= 1")
    if config.model.temperature <= 0:
        fail("model.temperature", "must be > 0")
    if not config.eval.ks or min(config.eval.ks) < 1:
        fail("eval.ks", "must list positive cutoffs")
    if config.eval.cold_item_max_events < 1:
        fail(
            "eval.cold_item_max_events", "must be >= 1 (items with fewer training events are cold)"
        )
    if config.eval.bootstrap_replicates < 0:
        fail("eval.bootstrap_replicates", "must be >= 0 (0: no intervals)")
    if not 0 < config.eval.interval_level < 1:
        fail("eval.interval_level", "must be in (0, 1)")
    if config.eval.every_n_steps is not None and config.eval.every_n_steps < 1:
        fail("eval.every_n_steps", "must be >= 1 or null")
    stopping = config.eval.early_stopping
    if stopping.patience is not None and stopping.patience < 1:
        fail("eval.early_stopping.patience", "must be >= 1 or null")
    if stopping.min_delta < 0:
        fail("eval.early_stopping.min_delta", "must be >= 0")
    funnel = config.eval.funnel
    if not funnel.ks or min(funnel.ks) < 1 or max(funnel.ks) > funnel.retrieve_n:
        fail(
            "eval.funnel.ks",
            f"must list cutoffs in [1, eval.funnel.retrieve_n={funnel.retrieve_n}]",
        )
    if funnel.max_queries < 1:
        fail("eval.funnel.max_queries", "must be >= 1")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        fail("train.max_steps", "must be >= 1 or null")
    if not config.loss.label_weights:
        fail("loss.label_weights", "name at least one label")
    if not config.sharding.sharding_types:
        fail("sharding.sharding_types", "allow at least one sharding type")
    if config.train.max_skipped_steps < 0:
        fail("train.max_skipped_steps", "must be >= 0")
    _validate_checkpoint(config.checkpoint, fail)
    _validate_temperature(config.model, fail)
    _validate_history(config, fail)
    _validate_debias(config.model.debias, fail)
    _validate_loss(config.loss, fail)
    _validate_negatives(config.negatives, fail)
    _validate_ranker(config.ranker, fail)
    _validate_alignment(config.alignment, fail)
    _validate_light_head(config, fail)
    _validate_distillation(config.distillation, fail)
    validate_features(config.features, fail)


def _validate_alignment(alignment: AlignmentConfig, fail: Callable[[str, str], None]) -> None:
    if alignment.k < 2:
        fail("alignment.k", "must be >= 2 (a policy over one item has nothing to learn)")
    if not 0 <= alignment.top_n <= alignment.k:
        fail("alignment.top_n", f"must be in [0, alignment.k={alignment.k}]")
    if alignment.exploration_alpha < 0:
        fail("alignment.exploration_alpha", "must be >= 0")
    if alignment.kl_coefficient < 0:
        fail("alignment.kl_coefficient", "must be >= 0")
    if alignment.dpo_beta <= 0:
        fail("alignment.dpo_beta", "must be > 0 (DPO's beta)")
    if alignment.steps < 1:
        fail("alignment.steps", "must be >= 1")
    if alignment.lr <= 0 or alignment.sparse_lr < 0:
        fail("alignment.lr", "lr must be > 0 and sparse_lr >= 0")
    if alignment.eval_k < 1:
        fail("alignment.eval_k", "must be >= 1")


def _validate_distillation(
    distillation: DistillationConfig, fail: Callable[[str, str], None]
) -> None:
    pointwise, listwise = distillation.pointwise, distillation.listwise
    if pointwise.weight < 0:
        fail("distillation.pointwise.weight", "must be >= 0")
    if listwise.weight < 0:
        fail("distillation.listwise.weight", "must be >= 0")
    if listwise.negatives_per_row is not None and listwise.negatives_per_row < 1:
        fail("distillation.listwise.negatives_per_row", "must be >= 1 or null (all candidates)")
    if listwise.teacher_temperature <= 0:
        fail("distillation.listwise.teacher_temperature", "must be > 0")
    if listwise.enabled and not listwise.teacher:
        fail(
            "distillation.listwise.teacher",
            "listwise distillation needs a trained ranker: a run directory of "
            "`twotower train-ranker` or one of its checkpoints/step-N folders",
        )


def _validate_ranker(ranker: RankerConfig, fail: Callable[[str, str], None]) -> None:
    if ranker.embedding_dim < 1:
        fail("ranker.embedding_dim", "must be >= 1")
    if ranker.cross_layers < 0:
        fail("ranker.cross_layers", "must be >= 0 (0: MLP only)")
    if ranker.low_rank < 1:
        fail("ranker.low_rank", "must be >= 1")
    if any(width < 1 for width in ranker.mlp):
        fail("ranker.mlp", f"hidden widths must be >= 1, got {ranker.mlp}")
    if ranker.sampled_negatives < 0:
        fail("ranker.sampled_negatives", "must be >= 0")


def _validate_light_head(config: ExperimentConfig, fail: Callable[[str, str], None]) -> None:
    head = config.model.light_head
    if not head.enabled:
        return
    if head.num_embeddings < 1:
        fail("model.light_head.num_embeddings", "must be >= 1")
    if any(width < 1 for width in head.hidden):
        fail("model.light_head.hidden", f"hidden widths must be >= 1, got {head.hidden}")
    if head.loss_weight <= 0:
        fail("model.light_head.loss_weight", "must be > 0 (disable the head with enabled=false)")
    if not 0 <= head.negatives_per_row < config.data.batch_size:
        fail(
            "model.light_head.negatives_per_row",
            f"must be in [0, data.batch_size={config.data.batch_size})",
        )
    if head.num_items < 1:
        fail("model.light_head.num_items", "must be >= 1")
    if head.num_knn_items < head.num_items:
        fail(
            "model.light_head.num_knn_items",
            f"must be >= model.light_head.num_items ({head.num_items}): the head reranks the "
            "retrieved items",
        )


def _validate_checkpoint(checkpoint: CheckpointConfig, fail: Callable[[str, str], None]) -> None:
    if checkpoint.every_n_steps is not None and checkpoint.every_n_steps < 1:
        fail("checkpoint.every_n_steps", "must be >= 1 or null (save only at the end)")
    if checkpoint.keep_last < 1:
        fail("checkpoint.keep_last", "must be >= 1")
    known = {"SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"}
    unknown = sorted(set(checkpoint.signals) - known)
    if unknown:
        fail("checkpoint.signals", f"unknown signals {unknown} (choose from {sorted(known)})")


def _validate_temperature(model: ModelConfig, fail: Callable[[str, str], None]) -> None:
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


def _validate_history(config: ExperimentConfig, fail: Callable[[str, str], None]) -> None:
    history = config.model.history
    if not history.enabled:
        return
    if history.max_length < 1 or history.num_layers < 1 or history.num_heads < 1:
        fail("model.history.max_length", "max_length, num_layers and num_heads must be >= 1")
    if history.recency_buckets < 0:
        fail("model.history.recency_buckets", "must be >= 0 (0: no recency embedding)")
    if not 0 <= history.dropout < 1:
        fail("model.history.dropout", "must be in [0, 1)")
    dim = config.model.table_dims.get("item_id", config.model.embedding_dim)
    if history.encoder is Encoder.SELF_ATTENTION and dim % history.num_heads:
        fail(
            "model.history.num_heads",
            f"must divide the item embedding dimension {dim} (model.embedding_dim / "
            "model.table_dims.item_id)",
        )
    if config.data.recent_history > 0:
        fail(
            "data.recent_history",
            "the history encoder sees the newest events itself; set data.recent_history=0 "
            "with model.history.enabled=true",
        )


def _validate_debias(debias: DebiasConfig, fail: Callable[[str, str], None]) -> None:
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


def _validate_loss(loss: LossConfig, fail: Callable[[str, str], None]) -> None:
    per_row = loss.negatives_per_row
    if per_row is not None and per_row < 1:
        fail("loss.negatives_per_row", "must be >= 1 or null (all candidates)")
    if loss.family in (LossFamily.COSINE, LossFamily.SAMPLED_SOFTMAX) and per_row is None:
        fail(
            "loss.negatives_per_row",
            f"loss.family={loss.family.value} needs the number of negatives per row "
            "(the positive:negative ratio)",
        )
    if loss.family is LossFamily.SOFTMAX and per_row is not None:
        fail(
            "loss.negatives_per_row",
            "loss.family=softmax uses every candidate; use loss.family=sampled_softmax "
            "to sample negatives per row",
        )
    if loss.margin < 0:
        fail("loss.margin", "must be >= 0")


def _validate_negatives(negatives: NegativesConfig, fail: Callable[[str, str], None]) -> None:
    log_q, mixed, memory, mined = (
        negatives.log_q,
        negatives.mixed,
        negatives.memory,
        negatives.mined,
    )
    if log_q.hash_size < 1 or log_q.hash_size & (log_q.hash_size - 1) or log_q.hash_size > 1 << 31:
        fail("negatives.log_q.hash_size", "must be a power of two, at most 2**31")
    if log_q.num_hashes < 1:
        fail("negatives.log_q.num_hashes", "must be >= 1")
    if not 0 < log_q.alpha <= 1:
        fail("negatives.log_q.alpha", "must be in (0, 1]")
    if mixed.num_samples < 0:
        fail("negatives.mixed.num_samples", "must be >= 0")
    if mixed.alpha < 0:
        fail("negatives.mixed.alpha", "must be >= 0")
    if memory.size < 0 or memory.warmup_steps < 0:
        fail("negatives.memory.size", "size and warmup_steps must be >= 0")
    if memory.size > 0 and memory.max_staleness_steps < 1:
        fail("negatives.memory.max_staleness_steps", "must be >= 1 when negatives.memory.size > 0")
    for name, hard in (("impressions", negatives.impressions), ("mined", mined)):
        if hard.per_row < 0:
            fail(f"negatives.{name}.per_row", "must be >= 0")
        if hard.weight <= 0:
            fail(f"negatives.{name}.weight", "must be > 0")
    if mined.per_row > 0:
        if mined.skip_top < 0 or mined.top_k <= mined.skip_top:
            fail(
                "negatives.mined.top_k",
                f"must exceed negatives.mined.skip_top ({mined.skip_top}) so there is a "
                "semi-hard band to sample from",
            )
        if mined.top_k - mined.skip_top < mined.per_row:
            fail(
                "negatives.mined.per_row",
                f"at most negatives.mined.top_k - negatives.mined.skip_top "
                f"({mined.top_k - mined.skip_top}) distinct items per row",
            )
        if mined.refresh_every_steps < 1:
            fail("negatives.mined.refresh_every_steps", "must be >= 1")


def to_yaml(config: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
