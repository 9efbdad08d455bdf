"""Typed configuration, on the ground floor: dataclasses validated by OmegaConf when a YAML file
loads, one module per section with its checks beside it.

Unknown keys, wrong types and invalid enum values are errors that name the key
(``data.batch_size``); ``a.b=c`` overrides from the command line go through the same checks.
Runtime objects (process groups, devices) never live here; they are passed to ``build`` calls.
This package imports nothing of the project, so loading a config never imports torch or FBGEMM.
"""

from config.alignment import (
    AlignmentConfig,
    AlignmentMethod,
    validate_alignment,
)
from config.data import (
    DataConfig,
    validate_data,
)
from config.distillation import (
    DistillationConfig,
    ListwiseDistillationConfig,
    PointwiseDistillationConfig,
    validate_distillation,
)
from config.errors import (
    ConfigError,
    Fail,
)
from config.evaluation import (
    EarlyStoppingConfig,
    EvalConfig,
    ExcludeRule,
    FunnelConfig,
    validate_eval,
)
from config.experiment import (
    ExperimentConfig,
    validate,
)
from config.features import (
    FeatureConfig,
    FeatureGroup,
    FeaturesConfig,
    IdPolicy,
    Pooling,
    Undeclared,
    validate_features,
)
from config.loading import (
    load_config,
    to_dict,
    to_yaml,
)
from config.loss import (
    Candidates,
    LossConfig,
    LossFamily,
    validate_loss,
)
from config.model import (
    Combiner,
    DebiasConfig,
    DebiasMode,
    DebiasPartConfig,
    Encoder,
    HistoryConfig,
    LightHeadConfig,
    ModelConfig,
    PositionDebiasConfig,
    Positions,
    Summary,
    UserDebiasConfig,
    validate_debias,
    validate_model,
    validate_temperature,
)
from config.negatives import (
    CorpusDistribution,
    HardNegativesConfig,
    LogQConfig,
    MemoryConfig,
    MinedNegativesConfig,
    MixedNegativesConfig,
    NegativesConfig,
    validate_negatives,
)
from config.ranker import (
    RankerConfig,
    validate_ranker,
)
from config.train import (
    CheckpointConfig,
    LoggingConfig,
    LRDecay,
    LRScheduleConfig,
    NonFinitePolicy,
    RunConfig,
    ShardingConfig,
    ShardingType,
    SparseOptimizer,
    TrainConfig,
    validate_checkpoint,
    validate_sharding,
    validate_train,
)

__all__ = [
    "LRDecay",
    "LRScheduleConfig",
    "AlignmentConfig",
    "AlignmentMethod",
    "CheckpointConfig",
    "Combiner",
    "ConfigError",
    "CorpusDistribution",
    "DataConfig",
    "DebiasConfig",
    "DebiasMode",
    "DebiasPartConfig",
    "DistillationConfig",
    "EarlyStoppingConfig",
    "Encoder",
    "EvalConfig",
    "ExcludeRule",
    "ExperimentConfig",
    "Fail",
    "FeatureConfig",
    "FeatureGroup",
    "FeaturesConfig",
    "FunnelConfig",
    "HardNegativesConfig",
    "HistoryConfig",
    "IdPolicy",
    "LightHeadConfig",
    "ListwiseDistillationConfig",
    "LogQConfig",
    "LoggingConfig",
    "Candidates",
    "LossConfig",
    "LossFamily",
    "MemoryConfig",
    "MinedNegativesConfig",
    "MixedNegativesConfig",
    "ModelConfig",
    "NegativesConfig",
    "NonFinitePolicy",
    "PointwiseDistillationConfig",
    "Pooling",
    "PositionDebiasConfig",
    "Positions",
    "RankerConfig",
    "RunConfig",
    "ShardingConfig",
    "ShardingType",
    "SparseOptimizer",
    "Summary",
    "TrainConfig",
    "Undeclared",
    "UserDebiasConfig",
    "load_config",
    "to_dict",
    "to_yaml",
    "validate",
    "validate_alignment",
    "validate_checkpoint",
    "validate_data",
    "validate_debias",
    "validate_distillation",
    "validate_eval",
    "validate_features",
    "validate_loss",
    "validate_model",
    "validate_negatives",
    "validate_ranker",
    "validate_sharding",
    "validate_temperature",
    "validate_train",
]
