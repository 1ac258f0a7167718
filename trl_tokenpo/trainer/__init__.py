from .base import TokenLevelDPOConfig, TokenLevelDPOTrainer
from .tdpo import TDPOConfig, TDPOTrainer
from .tisdpo import TISDPOConfig, TISDPOTrainer


__all__ = ["TDPOConfig", "TDPOTrainer", "TISDPOConfig", "TISDPOTrainer", "TokenLevelDPOConfig", "TokenLevelDPOTrainer"]
