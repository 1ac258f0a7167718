"""The result type of the per-token statistics and what both tile backends share.

:class:`TokenStats` is the one type every layer returns: :func:`~trl_tokenpo.kernels.fused_token_stats` (``[N]``
per scored token), a model patched by :func:`~trl_tokenpo.kernels.add_token_stats_head` (``[B, T-1]`` per position)
and the trainers (``(2B, T-1)`` for a ``[chosen; rejected]`` batch).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from transformers.utils import ModelOutput


# Upper bound on the number of elements of one float32 `[rows, V]` logits tile of the torch backend. A tile always
# holds the full vocabulary, so a tile has `max(1, TILE_ELEMENTS // V)` rows. The working set of one tile is a few such
# tensors (both models' logits and log-probs plus temporaries), so the transient memory is a small multiple of this
# budget (about 6x, in float32), independent of the number of tokens. The Triton backend has its own default
# (`tiles_triton.TILE_ELEMENTS`): two `[rows, columns]` tiles in the compute dtype and nothing else.
TILE_ELEMENTS = 2**25

# Statistics computed only when requested, besides the two label log-probs (always computed)
OPTIONAL_OUTPUTS = ("forward_kl", "reverse_kl", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")

# The fields that carry a gradient to the policy
DIFFERENTIABLE_OUTPUTS = ("policy_logps", "forward_kl", "reverse_kl")


@dataclasses.dataclass
class TokenStats(ModelOutput):
    """Per-token statistics of a policy and a reference language model.

    The shape depends on who returns it: ``[N]`` (one entry per scored token) from
    :func:`~trl_tokenpo.kernels.fused_token_stats`; ``[B, T-1]`` (zero where the label is ``-100``) from a model
    patched by :func:`~trl_tokenpo.kernels.add_token_stats_head`; ``(2B, T-1)`` for a ``[chosen; rejected]`` batch
    in the trainers. Fields that were not requested are ``None``.

    Attributes:
        policy_logps: float32 policy log-prob of each next-token label (differentiable).
        ref_logps: float32 reference log-prob of each label (no gradient). ``None`` in the trainers when the
            reference sums were precomputed (``precompute_ref_log_probs``).
        forward_kl: float32 ``KL(pi_ref || pi_theta)`` over the full vocabulary (differentiable), if requested.
        reverse_kl: float32 ``KL(pi_theta || pi_ref)`` over the full vocabulary (differentiable), if requested.
        entropy: float32 policy entropy (no gradient), if requested.
        mean_logits: float32 mean over the vocabulary of the transformed policy logits (no gradient), if requested.
        is_top1: bool, whether the label is the policy's first argmax, if requested.
        log_sum_sq_probs: float32 ``log sum_v p_v^2`` of the policy (no gradient), if requested.
        label_mask: bool, the scored positions (model patch only).
        aux_loss: MoE load-balancing loss of the policy when its config sets ``output_router_logits`` (model patch and
            trainers), else ``None``.
    """

    policy_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    forward_kl: torch.Tensor | None = None
    reverse_kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


# The per-token fields, in the order `TokenStatsFunction` returns them
PER_TOKEN_FIELDS = ("policy_logps", "ref_logps") + OPTIONAL_OUTPUTS


class Head(NamedTuple):
    """One model's side of the computation: ``hidden`` ``[N, H]``, LM head ``weight`` ``[V, H]`` and ``bias`` ``[V]``
    (already cast to ``dtype``, the dtype of the projections), and the logit transform
    ``z = softcap * tanh(scale * x / softcap)`` (``softcap=None``: ``z = scale * x``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None
    dtype: torch.dtype


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Dtype of the projections: the autocast dtype when autocast is on for the tensor's device, else its own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def check_outputs(outputs: tuple[str, ...]) -> tuple[str, ...]:
    outputs = tuple(outputs)
    unknown = [name for name in outputs if name not in OPTIONAL_OUTPUTS]
    if unknown:
        raise ValueError(f"Unknown token statistics {unknown}; choose among {OPTIONAL_OUTPUTS}.")
    return outputs


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc``; low-precision products are not rounded to the inputs' dtype.

    On CUDA, bf16 / fp16 operands go through cuBLAS with a float32 output accumulated in place (``beta = 1``), so the
    product is neither rounded nor materialized; elsewhere they are upcast first.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.dtype == b.dtype and mm_out_dtype_supported(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def mm_out_dtype_supported(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` runs on ``device`` (CUDA, from torch 2.8 on)."""
    return device.type == "cuda" and _MM_OUT_DTYPE


def _torch_at_least(version: str) -> bool:
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]) >= Version(version)


# `torch.addmm(..., out_dtype=torch.float32)` from bf16/fp16 inputs exists on CUDA from torch 2.8 on
_MM_OUT_DTYPE = _torch_at_least("2.8.0")
