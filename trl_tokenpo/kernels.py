"""Fused, tiled per-token statistics of a policy and a reference language model.

Token-level DPO variants need, at every scored completion position, quantities that depend on the full next-token
distributions of two models: the label log-probabilities of the policy and of the reference, the forward KL
``KL(pi_ref || pi_theta)`` (TDPO) and the reverse KL ``KL(pi_theta || pi_ref)`` (TIS-DPO's ``"reverse"`` term),
plus the per-token metrics TRL's DPOTrainer logs for the policy. Materializing ``[tokens, vocab]`` logits for both
models is what TRL's DPOTrainer avoids, so this module computes all of them in ONE pass over row tiles of both
models' logits:

* forward: each model's LM head is projected once per tile; nothing of size ``[N, V]`` is kept;
* backward: each tile is projected again (the reference only when a KL term receives a gradient) and turned into the
  gradient of the policy logits, which is folded into ``grad_hidden`` / ``grad_weight`` / ``grad_bias`` by matmuls.

Two entry points:

* :func:`fused_token_stats` (wrapping :class:`TokenStatsFunction`): the autograd function on hidden states and LM head
  weights, ``[N, H]`` rows that are all scored.
* :func:`add_token_stats_head`: patches a transformers causal LM so that ``model(..., token_stats=request)`` runs the
  backbone and returns either the reference's hidden states (reference mode) or the per-token statistics (policy
  mode). Everything happens inside ``forward``, so PEFT, DDP, DeepSpeed and gradient checkpointing wrap it as usual.

Notation in shapes: ``N`` scored tokens, ``H`` / ``H_ref`` hidden sizes, ``V`` vocabulary size, ``B`` batch rows,
``T`` sequence length.
"""

import dataclasses
import functools
import types
from contextlib import nullcontext
from typing import NamedTuple

import torch
from packaging.version import Version
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx


__all__ = [
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
]

# Upper bound on the number of elements of one float32 `[rows, V]` logits tile. A tile always holds the full
# vocabulary, so a tile has `max(1, TILE_ELEMENTS // V)` rows. The working set of one tile is a few such tensors
# (both models' logits and log-probs plus temporaries), so the transient memory is a small multiple of this budget
# (about 6x, in float32), independent of the number of tokens.
TILE_ELEMENTS = 2**25

# Statistics computed only when requested, besides the two label log-probs (always computed)
OPTIONAL_OUTPUTS = ("forward_kl", "reverse_kl", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")

# `torch.mm(..., out_dtype=torch.float32)` from bf16/fp16 inputs exists on CUDA from torch 2.8 on
_CUDA_MM_OUT_DTYPE = Version(torch.__version__.split("+")[0]) >= Version("2.8.0")

_IGNORE_INDEX = -100


class TokenStats(NamedTuple):
    """Per-token results of :func:`fused_token_stats`, each of shape ``[N]`` (``None`` when not requested).

    All are float32 except ``is_top1`` (bool). Only ``policy_logps``, ``forward_kl`` and ``reverse_kl`` carry a
    gradient (to the policy's hidden states and LM head); the others are detached.
    """

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    forward_kl: torch.Tensor | None = None
    reverse_kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------------------------


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Dtype of the projections: the autocast dtype when autocast is on for the tensor's device, else its own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _rows_per_tile(vocab_size: int, tile_elements: int) -> int:
    return max(1, tile_elements // max(1, vocab_size))


def _project(
    hidden: torch.Tensor,  # [n, H], compute dtype
    weight: torch.Tensor,  # [V, H], compute dtype
    bias: torch.Tensor | None,  # [V], compute dtype
    logit_scale: float,
    softcap: float | None,
    with_derivative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transformed float32 logits ``z = softcap * tanh(scale * x / softcap)`` of one tile, ``x = hidden @ W.T + b``.

    Returns ``z`` ``[n, V]`` and, when ``with_derivative``, ``dz/dx`` (``[n, V]`` with softcapping, else a Python
    float). The projection runs in the compute dtype; everything after it in float32.
    """
    raw = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())
    z = raw.float()
    del raw
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    derivative = logit_scale
    if softcap is not None:
        z.div_(softcap).tanh_()  # z now holds t = tanh(scale * x / softcap)
        if with_derivative:
            derivative = (1.0 - z * z).mul_(logit_scale)
        z.mul_(softcap)
    return z, (derivative if with_derivative else None)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc``; low-precision products are not rounded to the inputs' dtype."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _CUDA_MM_OUT_DTYPE and a.dtype == b.dtype:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


def _materialize(tensor: torch.Tensor | None, differentiable: bool) -> torch.Tensor | None:
    """A regular tensor from a (possibly FSDP2-sharded) DTensor parameter; other tensors are returned unchanged."""
    if tensor is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return tensor
    if not isinstance(tensor, DTensor):
        return tensor
    if differentiable:
        # `full_tensor()` all-gathers; its backward reduce-scatters the gradient into the sharded parameter
        return tensor.full_tensor()
    with torch.no_grad():
        return tensor.full_tensor()


def _check_outputs(outputs: tuple[str, ...]) -> tuple[str, ...]:
    outputs = tuple(outputs)
    unknown = [name for name in outputs if name not in OPTIONAL_OUTPUTS]
    if unknown:
        raise ValueError(f"Unknown token statistics {unknown}; choose among {OPTIONAL_OUTPUTS}.")
    return outputs


# ----------------------------------------------------------------------------------------------------------------------
# Autograd function
# ----------------------------------------------------------------------------------------------------------------------


class TokenStatsFunction(torch.autograd.Function):
    """Policy and reference label log-probs, forward / reverse KL and policy metrics, in one tiled pass.

    Inputs (positional, as passed to ``apply``):

    ``policy_hidden`` ``[N, H]``, ``policy_weight`` ``[V, H]``, ``policy_bias`` ``[V] | None``, ``ref_hidden``
    ``[N, H_ref]``, ``ref_weight`` ``[V, H_ref]``, ``ref_bias`` ``[V] | None``, ``labels`` ``[N]`` (int64, all valid),
    ``policy_logit_scale``, ``policy_softcap``, ``ref_logit_scale``, ``ref_softcap`` (float / float | None),
    ``outputs`` (tuple of names from :data:`OPTIONAL_OUTPUTS`), ``tile_elements`` (int).

    Outputs: the eight ``[N]`` tensors of :class:`TokenStats`, in that order (``None`` when not requested).

    Gradients reach ``policy_hidden`` / ``policy_weight`` / ``policy_bias`` from ``policy_logps``, ``forward_kl`` and
    ``reverse_kl``. Per transformed policy logit ``z`` (``p`` = policy, ``q`` = reference probabilities)::

        d logp_y / dz = onehot(y) - p
        d fkl / dz    = p - q
        d rkl / dz    = p * (log p - log q - rkl)

    chained through ``dz/dx = scale * (1 - tanh^2)`` (softcap) or ``scale``. The reference side never receives a
    gradient, even when ``ref_weight`` is the same parameter as ``policy_weight`` (PEFT with adapters disabled).
    Prefer :func:`fused_token_stats`, which also gathers ZeRO-3 / FSDP2 weights.
    """

    @staticmethod
    def forward(
        ctx,
        policy_hidden: torch.Tensor,  # [N, H]
        policy_weight: torch.Tensor,  # [V, H]
        policy_bias: torch.Tensor | None,  # [V]
        ref_hidden: torch.Tensor,  # [N, H_ref]
        ref_weight: torch.Tensor,  # [V, H_ref]
        ref_bias: torch.Tensor | None,  # [V]
        labels: torch.Tensor,  # [N]
        policy_logit_scale: float,
        policy_softcap: float | None,
        ref_logit_scale: float,
        ref_softcap: float | None,
        outputs: tuple[str, ...],
        tile_elements: int,
    ):
        # Gradients of unused differentiable outputs arrive as None instead of zero tensors
        ctx.set_materialize_grads(False)
        num_tokens = policy_hidden.shape[0]
        vocab_size = policy_weight.shape[0]
        if policy_hidden.dim() != 2 or ref_hidden.dim() != 2 or labels.dim() != 1:
            raise ValueError("policy_hidden and ref_hidden must be [N, H] and labels [N].")
        if ref_hidden.shape[0] != num_tokens or labels.shape[0] != num_tokens:
            raise ValueError(
                f"Row mismatch: policy_hidden {tuple(policy_hidden.shape)}, ref_hidden {tuple(ref_hidden.shape)}, "
                f"labels {tuple(labels.shape)}."
            )
        if ref_weight.shape[0] != vocab_size:
            raise ValueError(
                f"Vocabulary mismatch: policy head has {vocab_size} rows, reference {ref_weight.shape[0]}."
            )

        want = set(outputs)
        policy_dtype = _compute_dtype(policy_hidden)
        ref_dtype = _compute_dtype(ref_hidden)
        device = policy_hidden.device
        rows = _rows_per_tile(vocab_size, tile_elements)

        def empty(dtype=torch.float32):
            return torch.empty(num_tokens, device=device, dtype=dtype)

        policy_logps, ref_logps = empty(), empty()
        forward_kl = empty() if "forward_kl" in want else None
        reverse_kl = empty() if "reverse_kl" in want else None
        entropy = empty() if "entropy" in want else None
        mean_logits = empty() if "mean_logits" in want else None
        is_top1 = empty(torch.bool) if "is_top1" in want else None
        log_sum_sq_probs = empty() if "log_sum_sq_probs" in want else None
        needs_ref = forward_kl is not None or reverse_kl is not None
        # Per-row log-partition functions, kept for the backward: it then turns each recomputed tile into log-probs by
        # one in-place subtraction instead of a second log-softmax (three passes over the tile and a new buffer)
        policy_lse = empty()
        ref_lse = empty() if needs_ref else None

        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            # Cast once per call (a no-op in the usual case where weights already have the compute dtype)
            p_w, p_b = policy_weight.to(policy_dtype), None if policy_bias is None else policy_bias.to(policy_dtype)
            r_w, r_b = ref_weight.to(ref_dtype), None if ref_bias is None else ref_bias.to(ref_dtype)
            for start in range(0, num_tokens, rows):
                end = min(start + rows, num_tokens)
                target = labels[start:end].unsqueeze(-1)  # [n, 1]
                z_pol, _ = _project(
                    policy_hidden[start:end].to(policy_dtype), p_w, p_b, policy_logit_scale, policy_softcap
                )
                if mean_logits is not None:
                    mean_logits[start:end] = z_pol.mean(-1)
                if is_top1 is not None:
                    # `argmax` returns the FIRST maximum: a label tied with an earlier token is not top-1
                    is_top1[start:end] = z_pol.argmax(-1) == labels[start:end]
                # log-softmax in place: z - logsumexp(z), keeping the logsumexp
                lse = torch.logsumexp(z_pol, dim=-1, keepdim=True)  # [n, 1]
                policy_lse[start:end] = lse.squeeze(-1)
                lp_pol = z_pol.sub_(lse)  # [n, V]
                del z_pol
                z_ref, _ = _project(ref_hidden[start:end].to(ref_dtype), r_w, r_b, ref_logit_scale, ref_softcap)
                lse = torch.logsumexp(z_ref, dim=-1, keepdim=True)
                if ref_lse is not None:
                    ref_lse[start:end] = lse.squeeze(-1)
                lp_ref = z_ref.sub_(lse)  # [n, V]
                del z_ref, lse
                policy_logps[start:end] = lp_pol.gather(-1, target).squeeze(-1)
                ref_logps[start:end] = lp_ref.gather(-1, target).squeeze(-1)
                if log_sum_sq_probs is not None:
                    log_sum_sq_probs[start:end] = torch.logsumexp(2.0 * lp_pol, dim=-1)
                if forward_kl is not None:
                    forward_kl[start:end] = torch.sub(lp_ref, lp_pol).mul_(lp_ref.exp()).sum(-1)
                if reverse_kl is not None or entropy is not None:
                    p_pol = lp_pol.exp()
                    if reverse_kl is not None:
                        reverse_kl[start:end] = torch.sub(lp_pol, lp_ref).mul_(p_pol).sum(-1)
                    if entropy is not None:
                        entropy[start:end] = p_pol.mul_(lp_pol).sum(-1).neg_()  # last use of p_pol
                    del p_pol

        ctx.save_for_backward(
            policy_hidden,
            policy_weight,
            policy_bias,
            ref_hidden if needs_ref else None,
            ref_weight if needs_ref else None,
            ref_bias if needs_ref else None,
            labels,
            policy_lse,
            ref_lse,
            reverse_kl,
        )
        ctx.transforms = (policy_logit_scale, policy_softcap, ref_logit_scale, ref_softcap)
        ctx.dtypes = (policy_dtype, ref_dtype)
        ctx.rows = rows
        ctx.mark_non_differentiable(
            *(x for x in (ref_logps, entropy, mean_logits, is_top1, log_sum_sq_probs) if x is not None)
        )
        return policy_logps, ref_logps, forward_kl, reverse_kl, entropy, mean_logits, is_top1, log_sum_sq_probs

    @staticmethod
    def backward(ctx, grad_logps, _grad_ref_logps, grad_fkl, grad_rkl, *_metric_grads):
        (
            policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels, policy_lse, ref_lse,
            saved_rkl,
        ) = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        no_grads = (None,) * 13
        if grad_logps is None and grad_fkl is None and grad_rkl is None:
            return no_grads
        if not (need_hidden or need_weight or need_bias):
            return no_grads
        policy_scale, policy_softcap, ref_scale, ref_softcap = ctx.transforms
        policy_dtype, ref_dtype = ctx.dtypes
        rows = ctx.rows
        needs_ref = grad_fkl is not None or grad_rkl is not None
        device = policy_hidden.device
        num_tokens = policy_hidden.shape[0]
        gathered = (policy_weight, policy_bias) + ((ref_weight, ref_bias) if needs_ref else ())

        with torch.no_grad(), torch.autocast(device.type, enabled=False), maybe_gather_lm_head_ctx(*gathered):
            p_w = policy_weight.to(policy_dtype)
            p_b = None if policy_bias is None else policy_bias.to(policy_dtype)
            if needs_ref:
                r_w = ref_weight.to(ref_dtype)
                r_b = None if ref_bias is None else ref_bias.to(ref_dtype)
            # Accumulate in float32 whatever the model dtype
            grad_hidden = torch.zeros(policy_hidden.shape, device=device, dtype=torch.float32) if need_hidden else None
            grad_weight = torch.zeros(p_w.shape, device=p_w.device, dtype=torch.float32) if need_weight else None
            grad_bias = (
                torch.zeros(policy_bias.shape, device=device, dtype=torch.float32)
                if need_bias and policy_bias is not None
                else None
            )
            g_lp = None if grad_logps is None else grad_logps.float()
            g_fkl = None if grad_fkl is None else grad_fkl.float()
            g_rkl = None if grad_rkl is None else grad_rkl.float()

            for start in range(0, num_tokens, rows):
                end = min(start + rows, num_tokens)
                h_pol = policy_hidden[start:end].to(policy_dtype)  # [n, H]
                z_pol, dz_dx = _project(h_pol, p_w, p_b, policy_scale, policy_softcap, with_derivative=True)
                lp_pol = z_pol.sub_(policy_lse[start:end].unsqueeze(-1))  # [n, V], log-softmax with the forward's lse
                del z_pol
                p_pol = lp_pol.exp()
                # Per-row coefficient of p_pol in the combined gradient:
                #   g_lp * (onehot - p) + g_fkl * (p - q) + g_rkl * p * (log p - log q - rkl)
                # = p * (-g_lp + g_fkl - g_rkl * rkl + g_rkl * (log p - log q)) - g_fkl * q + g_lp * onehot
                coef = torch.zeros(end - start, device=device, dtype=torch.float32)
                if g_lp is not None:
                    coef -= g_lp[start:end]
                if g_fkl is not None:
                    coef += g_fkl[start:end]
                if needs_ref:
                    z_ref, _ = _project(ref_hidden[start:end].to(ref_dtype), r_w, r_b, ref_scale, ref_softcap)
                    lp_ref = z_ref.sub_(ref_lse[start:end].unsqueeze(-1))  # [n, V]
                    del z_ref
                if g_rkl is not None:
                    log_ratio = lp_pol.sub_(lp_ref)  # lp_pol is not needed any more: reuse its storage
                    coef -= g_rkl[start:end] * saved_rkl[start:end]  # the forward's per-row reverse KL
                    grad_z = log_ratio.mul_(g_rkl[start:end].unsqueeze(-1)).add_(coef.unsqueeze(-1)).mul_(p_pol)
                else:
                    grad_z = p_pol.mul_(coef.unsqueeze(-1))
                del lp_pol, p_pol
                if g_fkl is not None:
                    grad_z.sub_(lp_ref.exp_().mul_(g_fkl[start:end].unsqueeze(-1)))
                if needs_ref:
                    del lp_ref
                if g_lp is not None:
                    grad_z.scatter_add_(-1, labels[start:end].unsqueeze(-1), g_lp[start:end].unsqueeze(-1))
                # [n, V], gradient w.r.t. the raw projection output (no pass over the tile for a unit scale)
                grad_x = grad_z if isinstance(dz_dx, float) and dz_dx == 1.0 else grad_z.mul_(dz_dx)
                if grad_bias is not None:
                    grad_bias += grad_x.sum(0)
                # Like autograd through a low-precision linear layer, the logits gradient takes the compute dtype
                grad_x = grad_x.to(policy_dtype)
                if grad_hidden is not None:
                    _accumulate_mm(grad_hidden[start:end], grad_x, p_w)
                if grad_weight is not None:
                    _accumulate_mm(grad_weight, grad_x.t(), h_pol)

        return (
            None if grad_hidden is None else grad_hidden.to(policy_hidden.dtype),
            None if grad_weight is None else grad_weight.to(policy_weight.dtype),
            None if grad_bias is None else grad_bias.to(policy_bias.dtype),
        ) + (None,) * 10


def fused_token_stats(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    policy_bias: torch.Tensor | None,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    policy_logit_scale: float = 1.0,
    policy_softcap: float | None = None,
    ref_logit_scale: float = 1.0,
    ref_softcap: float | None = None,
    outputs: tuple[str, ...] = ("forward_kl",),
    tile_elements: int | None = None,
) -> TokenStats:
    """Per-token statistics of a policy and a reference LM head on ``N`` scored positions, in one tiled pass.

    Args:
        policy_hidden: ``[N, H]`` policy hidden states (usually requires grad).
        policy_weight: ``[V, H]`` policy LM head weight (may require grad; may be a ZeRO-3 or FSDP2 parameter).
        policy_bias: ``[V]`` or ``None``.
        ref_hidden: ``[N, H_ref]`` reference hidden states; never receives a gradient.
        ref_weight: ``[V, H_ref]`` reference LM head weight; never receives a gradient, even when it is
            ``policy_weight`` itself.
        ref_bias: ``[V]`` or ``None``.
        labels: ``[N]`` int64 labels, all in ``[0, V)``.
        policy_logit_scale / ref_logit_scale: multiplier applied to the logits before softcapping.
        policy_softcap / ref_softcap: ``final_logit_softcapping``: ``z = c * tanh(scale * x / c)``; ``None`` = off.
        outputs: optional statistics to compute, among :data:`OPTIONAL_OUTPUTS`.
        tile_elements: element budget of one float32 ``[rows, V]`` tile (default :data:`TILE_ELEMENTS`).

    Returns:
        :class:`TokenStats` of ``[N]`` float32 tensors (``is_top1``: bool), ``None`` for statistics not requested.
        Under autocast the projections run in the autocast dtype and the statistics in float32.
    """
    outputs = _check_outputs(outputs)
    tile_elements = TILE_ELEMENTS if tile_elements is None else int(tile_elements)
    if tile_elements < 1:
        raise ValueError("tile_elements must be positive.")
    # FSDP2: all-gather sharded heads; share one gather when the reference head is the policy head
    same_weight = ref_weight is policy_weight
    same_bias = ref_bias is not None and ref_bias is policy_bias
    full_policy_weight = _materialize(policy_weight, differentiable=True)
    full_policy_bias = _materialize(policy_bias, differentiable=True)
    full_ref_weight = full_policy_weight if same_weight else _materialize(ref_weight, differentiable=False)
    full_ref_bias = full_policy_bias if same_bias else _materialize(ref_bias, differentiable=False)
    with maybe_gather_lm_head_ctx(full_policy_weight, full_policy_bias, full_ref_weight, full_ref_bias):
        results = TokenStatsFunction.apply(
            policy_hidden,
            full_policy_weight,
            full_policy_bias,
            ref_hidden.detach(),
            full_ref_weight,
            full_ref_bias,
            labels,
            float(policy_logit_scale),
            None if policy_softcap is None else float(policy_softcap),
            float(ref_logit_scale),
            None if ref_softcap is None else float(ref_softcap),
            outputs,
            tile_elements,
        )
    return TokenStats(*results)


# ----------------------------------------------------------------------------------------------------------------------
# Model patch
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReferenceHidden:
    """What a reference-mode call returns, to be passed back in the policy-mode request.

    Attributes:
        hidden: ``[N, H_ref]`` detached reference hidden states at the scored positions (row-major order of ``mask``).
        weight: ``[V, H_ref]`` the reference LM head weight (the parameter itself, so ZeRO-3 / FSDP2 can gather it).
        bias: ``[V]`` or ``None``.
        logit_scale: logit multiplier of the reference model's config.
        softcap: ``final_logit_softcapping`` of the reference model's config, or ``None``.
        mask: ``[B, T-1]`` bool, the scored positions (``labels[:, 1:] != -100``).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    mask: torch.Tensor


@dataclasses.dataclass
class TokenStatsRequest:
    """The ``token_stats`` keyword of a model patched by :func:`add_token_stats_head`.

    Attributes:
        labels: ``[B, T]`` int64, unshifted like the input ids (position ``t`` predicts ``labels[:, t + 1]``), ``-100``
            on positions that are not scored.
        reference: ``None`` for reference mode, or the :class:`ReferenceHidden` a reference-mode call returned (on the
            same inputs and labels) for policy mode.
        outputs: optional statistics to compute in policy mode, among :data:`OPTIONAL_OUTPUTS`.
        tile_elements: tile budget override (default :data:`TILE_ELEMENTS`).
    """

    labels: torch.Tensor
    reference: ReferenceHidden | None = None
    outputs: tuple[str, ...] = ("forward_kl",)
    tile_elements: int | None = None


@dataclasses.dataclass
class TokenStatsOutput(ModelOutput):
    """What a policy-mode call returns. Per-token fields are ``[B, T-1]`` (zero where the label is ``-100``).

    Attributes:
        policy_logps: float32 policy log-prob of each next-token label (differentiable).
        ref_logps: float32 reference log-prob of each label (no gradient).
        forward_kl: float32 ``KL(pi_ref || pi_theta)`` per position (differentiable), if requested.
        reverse_kl: float32 ``KL(pi_theta || pi_ref)`` per position (differentiable), if requested.
        entropy: float32 policy entropy (no gradient), if requested.
        mean_logits: float32 mean over the vocabulary of the transformed policy logits (no gradient), if requested.
        is_top1: bool, whether the label is the policy's first argmax, if requested.
        log_sum_sq_probs: float32 ``log sum_v p_v^2`` of the policy (no gradient), if requested.
        label_mask: bool, the scored positions.
        aux_loss: MoE load-balancing loss of the policy when its config sets ``output_router_logits``, else ``None``.
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


def logit_transform_from_config(config) -> tuple[float, float | None]:
    """``(logit_scale, final_logit_softcapping)`` of a model config, read the way TRL's fused LM head reads them.

    The scale comes from the first of ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` that is set, else
    from ``logits_scaling`` (a divisor, except for HyperCLOVA X where it multiplies); default 1.0.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None)
        if scale is not None:
            break
    if scale is None:
        logits_scaling = getattr(text_config, "logits_scaling", None)
        if logits_scaling is not None:
            is_hyperclovax = getattr(text_config, "model_type", None) == "hyperclovax"
            scale = logits_scaling if is_hyperclovax else 1.0 / logits_scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def _check_plain_lm_head(lm_head: torch.nn.Module) -> None:
    # The kernel reads `lm_head.weight` directly; an active LoRA adapter on the head itself would be ignored
    lora_a = getattr(lm_head, "lora_A", None)
    if lora_a is None or getattr(lm_head, "disable_adapters", False) or getattr(lm_head, "merged", False):
        return
    active = getattr(lm_head, "active_adapters", ())
    if any(name in lora_a for name in active):
        raise NotImplementedError(
            "token_stats reads lm_head.weight directly and does not support a LoRA adapter on the LM head; "
            "target other modules or use `modules_to_save=['lm_head']`."
        )


def _load_balancing_loss(model, text_config, router_logits, attention_mask) -> torch.Tensor:
    # The Mixtral implementation is the one the transformers MoE families share
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None)
    if num_experts is None:
        num_experts = getattr(text_config, "num_local_experts", None)
    if num_experts is None:
        num_experts = model.num_experts
    top_k = getattr(text_config, "num_experts_per_tok", None)
    if top_k is None:
        top_k = model.num_experts_per_tok
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def _token_stats_forward(self, args, kwargs, request: TokenStatsRequest):
    """The ``token_stats`` path of a patched model's forward (``self`` is the transformers causal LM)."""
    if kwargs.pop("fused_lm_head", False):
        raise ValueError("Pass either `fused_lm_head=True` or `token_stats`, not both.")
    for name in ("labels", "shift_labels"):
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"With `token_stats`, pass the labels in the request, not as `{name}`.")
    for name in ("num_items_in_batch", "return_dict", "logits_to_keep"):
        kwargs.pop(name, None)
    kwargs["use_cache"] = False
    text_config = self.config.get_text_config()
    policy_mode = request.reference is not None
    if policy_mode and getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)

    # Looked up on each call: PEFT, FSDP and DeepSpeed replace modules after patching
    backbone = self.base_model
    with nullcontext() if policy_mode else torch.no_grad():
        backbone_outputs = backbone(*args, **kwargs)
    hidden = backbone_outputs.last_hidden_state[:, :-1]  # [B, T-1, H]
    labels = request.labels[:, 1:]  # [B, T-1]
    if hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"Hidden states {tuple(hidden.shape[:2])} do not line up with the labels {tuple(labels.shape)} (both "
            "after the shift). Prompt-learning PEFT methods that prepend virtual tokens are not supported."
        )
    lm_head = self.get_output_embeddings()
    _check_plain_lm_head(lm_head)
    weight, bias = lm_head.weight, lm_head.bias
    # With `device_map`, the backbone can end on another device than the head
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    mask = labels != _IGNORE_INDEX  # [B, T-1]
    logit_scale, softcap = logit_transform_from_config(self.config)

    if not policy_mode:
        return ReferenceHidden(
            hidden=hidden[mask].detach(), weight=weight, bias=bias, logit_scale=logit_scale, softcap=softcap, mask=mask
        )

    reference = request.reference
    if reference.mask.shape != mask.shape or not torch.equal(reference.mask.to(mask.device), mask):
        raise ValueError("The reference was computed on other scored positions than the policy's labels.")
    stats = fused_token_stats(
        hidden[mask],
        weight,
        bias,
        reference.hidden.to(weight.device),
        reference.weight,
        reference.bias,
        labels[mask],
        policy_logit_scale=logit_scale,
        policy_softcap=softcap,
        ref_logit_scale=reference.logit_scale,
        ref_softcap=reference.softcap,
        outputs=_check_outputs(request.outputs),
        tile_elements=request.tile_elements,
    )
    # `masked_scatter` keeps the outputs connected to the graph even when no position is scored
    per_position = {
        name: None if value is None else value.new_zeros(mask.shape).masked_scatter(mask, value)
        for name, value in stats._asdict().items()
    }

    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _load_balancing_loss(
            self, text_config, backbone_outputs.router_logits, kwargs.get("attention_mask")
        )
    return TokenStatsOutput(**per_position, label_mask=mask, aux_loss=aux_loss)


def add_token_stats_head(model: torch.nn.Module) -> None:
    """Patch a transformers causal LM so that ``model(..., token_stats=request)`` returns fused token statistics.

    Without ``token_stats`` (or with ``token_stats=None``) the previous forward runs unchanged, so generation and
    TRL's ``fused_lm_head=True`` path (:func:`trl.trainer.utils.add_fused_lm_head`, applied before or after this) keep
    working. With a :class:`TokenStatsRequest`:

    * ``request.reference is None`` (reference mode): only the backbone runs, under ``torch.no_grad()``; returns a
      :class:`ReferenceHidden` with the hidden states at the scored positions and the LM head parameters. No LM head
      projection happens.
    * otherwise (policy mode): the backbone runs, and the policy and reference heads are projected together in tiles
      by :func:`fused_token_stats`; returns a :class:`TokenStatsOutput` of ``[B, T-1]`` tensors.

    Patch the transformers model itself (for PEFT, ``peft_model.get_base_model()``, or before wrapping): PEFT, DDP and
    DeepSpeed wrappers pass the keyword through to it. Prompt-learning PEFT (virtual tokens) is not supported; an
    active LoRA adapter on the LM head itself is rejected (``modules_to_save`` works).
    """
    if getattr(model, "_token_stats_head_added", False):
        return
    previous_forward = model.forward
    # Re-bind the previous forward to `self` on each call when it is a method of this model, so that a deep copy of
    # the patched model runs its own weights
    rebind = isinstance(previous_forward, types.MethodType) and previous_forward.__self__ is model
    previous_function = previous_forward.__func__ if rebind else previous_forward

    # Keep the class forward's signature: `generate` validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, token_stats: TokenStatsRequest | None = None, **kwargs):
        if token_stats is None:
            return previous_function(self, *args, **kwargs) if rebind else previous_function(*args, **kwargs)
        return _token_stats_forward(self, args, kwargs, token_stats)

    model.forward = types.MethodType(forward, model)
    model._token_stats_head_added = True
