"""trl-tokenpo: token-level preference optimization (TDPO, TIS-DPO) as drop-in replacements for trl.DPOTrainer."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# bitsandbytes (imported by peft, hence by trl) logs "Failed to load CPU gemm_4bit_forward from kernels-community" at
# import time on CPUs with AVX512-BF16 when its optional Hub kernel cannot be fetched; it then uses its own CPU code.
# The line opens every run of this package's commands (even `--help`) without anything to act on: drop that record.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
)

# The public API, imported on first use so that `import trl_tokenpo` (and the command line's `--help`) does not import
# torch, transformers and trl.
_EXPORTS = {
    "ContrastiveWeightEstimator": ".estimator",
    "DataCollatorForTokenPreference": ".data",
    "TDPOConfig": ".trainer",
    "TDPOTrainer": ".trainer",
    "TISDPOConfig": ".trainer",
    "TISDPOTrainer": ".trainer",
    "TokenColumn": ".data",
    "TokenColumnError": ".data",
    "TokenLevelDPOConfig": ".trainer",
    "TokenLevelDPOTrainer": ".trainer",
    "WeightEstimatorConfig": ".estimator",
    "WeightTransform": ".weights",
}
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

if TYPE_CHECKING:
    from .data import DataCollatorForTokenPreference, TokenColumn, TokenColumnError
    from .estimator import ContrastiveWeightEstimator, WeightEstimatorConfig
    from .trainer import (
        TDPOConfig,
        TDPOTrainer,
        TISDPOConfig,
        TISDPOTrainer,
        TokenLevelDPOConfig,
        TokenLevelDPOTrainer,
    )
    from .weights import WeightTransform


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule, e.g. `trl_tokenpo.synthetic` after a bare `import trl_tokenpo`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
