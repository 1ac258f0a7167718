"""The contrastive weight estimator: token rewards from a pair of LoRA adapters (or system prompts) on one base model,
stored on disk. Data flows one way: `pair` (fit or load the adapters) -> key -> `store` (which shards are missing) ->
`inputs` + `model_state` + `scoring` (score them) -> `store` -> the returned dataset."""

from ..data import REWARD_COLUMNS
from ..fingerprint import (
    fingerprint,
    fingerprint_base_model,
    fingerprint_dataset,
    fingerprint_tokenizer,
    reference_fingerprint,
)
from .config import SYSTEM_PROMPT_PAIRS, WeightEstimatorConfig
from .estimator import REF_COLUMNS, ContrastiveWeightEstimator, EstimatorStats
from .scoring import Separation
from .store import ShardedScoreCache


__all__ = [
    "REF_COLUMNS",
    "REWARD_COLUMNS",
    "SYSTEM_PROMPT_PAIRS",
    "ContrastiveWeightEstimator",
    "EstimatorStats",
    "Separation",
    "ShardedScoreCache",
    "WeightEstimatorConfig",
    "fingerprint",
    "fingerprint_base_model",
    "fingerprint_dataset",
    "fingerprint_tokenizer",
    "reference_fingerprint",
]
