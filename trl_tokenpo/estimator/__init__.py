"""The contrastive weight estimator: token rewards from a pair of LoRA adapters (or system prompts) on one base model,
cached on disk."""

from .cache import (
    ShardedScoreCache,
    fingerprint,
    fingerprint_base_model,
    fingerprint_dataset,
    fingerprint_module,
    fingerprint_tokenizer,
    reference_fingerprint,
)
from .config import SYSTEM_PROMPT_PAIRS, WeightEstimatorConfig
from .estimator import REF_COLUMNS, REWARD_COLUMNS, ContrastiveWeightEstimator


__all__ = [
    "REF_COLUMNS",
    "REWARD_COLUMNS",
    "SYSTEM_PROMPT_PAIRS",
    "ContrastiveWeightEstimator",
    "ShardedScoreCache",
    "WeightEstimatorConfig",
    "fingerprint",
    "fingerprint_base_model",
    "fingerprint_dataset",
    "fingerprint_module",
    "fingerprint_tokenizer",
    "reference_fingerprint",
]
