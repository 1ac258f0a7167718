"""trl-tokenpo: token-level preference optimization (TDPO, TIS-DPO) as drop-in replacements for trl.DPOTrainer."""

__version__ = "0.1.0"

from .data import DataCollatorForTokenPreference, TokenColumn, TokenColumnError
from .estimator import ContrastiveWeightEstimator, WeightEstimatorConfig
from .trainer import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer, TokenLevelDPOConfig, TokenLevelDPOTrainer
from .weights import WeightTransform


__all__ = [
    "ContrastiveWeightEstimator",
    "DataCollatorForTokenPreference",
    "TDPOConfig",
    "TDPOTrainer",
    "TISDPOConfig",
    "TISDPOTrainer",
    "TokenColumn",
    "TokenColumnError",
    "TokenLevelDPOConfig",
    "TokenLevelDPOTrainer",
    "WeightEstimatorConfig",
    "WeightTransform",
]
