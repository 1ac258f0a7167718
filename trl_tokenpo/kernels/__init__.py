"""Fused, tiled per-token statistics of a policy and a reference language model.

Token-level DPO variants need, at every scored completion position, quantities that depend on the full next-token
distributions of two models: the label log-probabilities of the policy and of the reference, the forward KL
``KL(pi_ref || pi_theta)`` (TDPO) and the reverse KL ``KL(pi_theta || pi_ref)`` (TIS-DPO's ``"reverse"`` term),
plus the per-token metrics TRL's DPOTrainer logs for the policy. Materializing ``[tokens, vocab]`` logits for both
models is what TRL's DPOTrainer avoids, so this package computes all of them in ONE pass over tiles of both models'
logits:

* forward: each model's LM head is projected once per tile; nothing of size ``[N, V]`` is kept;
* backward: each tile is projected again (the reference only when a KL term receives a gradient) and turned into the
  gradient of the policy logits, which is folded into ``grad_hidden`` / ``grad_weight`` / ``grad_bias`` by matmuls.

Layout:

* :mod:`.stats`: the result type :class:`TokenStats` (the one type of every layer: ``[N]`` from the function,
  ``[B, T-1]`` from the model patch, ``(2B, T-1)`` in the trainers) and shared helpers;
* :mod:`.tiles_torch` / :mod:`.tiles_triton`: the tile math, in torch operations (every device) or in one Triton
  kernel per tile and direction (CUDA; CPU tensors under Triton's interpreter);
* :mod:`.function`: :class:`TokenStatsFunction` (autograd) and :func:`fused_token_stats` (``backend="auto"`` picks
  Triton on CUDA when ``triton`` is importable, torch elsewhere);
* :mod:`.patch`: :func:`add_token_stats_head`, which makes ``model(..., token_stats=request)`` run the backbone and
  return either the reference's hidden states (reference mode) or the statistics (policy mode).

Notation in shapes: ``N`` scored tokens, ``H`` / ``H_ref`` hidden sizes, ``V`` vocabulary size, ``B`` batch rows,
``T`` sequence length.
"""

from .function import BACKENDS, TokenStatsFunction, fused_token_stats, resolve_backend
from .patch import ReferenceHidden, TokenStatsRequest, add_token_stats_head, logit_transform_from_config
from .stats import OPTIONAL_OUTPUTS, TILE_ELEMENTS, TokenStats


# The model patch's output type before the three result types became one; kept so that old imports work
TokenStatsOutput = TokenStats

__all__ = [
    "BACKENDS",
    "OPTIONAL_OUTPUTS",
    "TILE_ELEMENTS",
    "ReferenceHidden",
    "TokenStats",
    "TokenStatsFunction",
    "TokenStatsOutput",
    "TokenStatsRequest",
    "add_token_stats_head",
    "fused_token_stats",
    "logit_transform_from_config",
    "resolve_backend",
]
