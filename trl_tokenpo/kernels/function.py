"""The autograd function of the fused token statistics, and its entry point :func:`fused_token_stats`.

The function owns what does not depend on how a tile is folded: argument checks, dtypes, which statistics and which
gradients are needed, ZeRO-3 / FSDP2 gathering of the LM heads, float32 gradient accumulators. The tile work is done
by one of two backends with the same contract: :mod:`.tiles_torch` (torch operations, every device) and
:mod:`.tiles_triton` (one Triton kernel per tile and direction, CUDA, or CPU tensors under Triton's interpreter).
"""

from __future__ import annotations

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from . import tiles_torch, tiles_triton
from .stats import PER_TOKEN_FIELDS, Head, TokenStats, check_outputs, compute_dtype


BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on ``device``: ``"auto"`` is Triton on CUDA when ``triton`` is importable (3.3 or newer,
    see :data:`tiles_triton.MIN_VERSION`), else torch.

    ``"triton"`` on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first
    imported); it is meant for tests, not for speed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and tiles_triton.available() else "torch"
    if backend == "triton":
        if not tiles_triton.available():
            found = tiles_triton.version()
            have = "it is not installed" if found is None else f"found {found[0]}.{found[1]}"
            raise ImportError(
                "backend='triton' needs the `triton` package, release "
                f"{'.'.join(map(str, tiles_triton.MIN_VERSION))} or newer (`pip install triton`; {have}); use 'torch'."
            )
        if device.type == "cpu" and not tiles_triton.interpreted():
            raise RuntimeError(
                "backend='triton' on CPU tensors runs Triton's interpreter, which must be switched on before `triton` "
                "is first imported: set TRITON_INTERPRET=1 in the environment of the process. Or use backend='torch'."
            )
        if device.type == "cpu" and tiles_triton.version() < tiles_triton.MIN_INTERPRETER_VERSION:
            raise RuntimeError(
                "backend='triton' on CPU tensors needs Triton's interpreter from release "
                f"{'.'.join(map(str, tiles_triton.MIN_INTERPRETER_VERSION))} on; use backend='torch' or upgrade triton."
            )
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"backend='triton' runs on CUDA tensors; got {device.type}. Use backend='torch'.")
    return backend


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


def _head(hidden, weight, bias, scale, softcap, dtype) -> Head:
    # Cast once per call (a no-op in the usual case where weights already have the compute dtype)
    return Head(hidden, weight.to(dtype), None if bias is None else bias.to(dtype), scale, softcap, dtype)


def _tiles(backend: str):
    return tiles_triton if backend == "triton" else tiles_torch


class TokenStatsFunction(torch.autograd.Function):
    """Policy and reference label log-probs, forward / reverse KL and policy metrics, in one tiled pass.

    Inputs (positional, as passed to ``apply``):

    ``policy_hidden`` ``[N, H]``, ``policy_weight`` ``[V, H]``, ``policy_bias`` ``[V] | None``, ``ref_hidden``
    ``[N, H_ref]``, ``ref_weight`` ``[V, H_ref]``, ``ref_bias`` ``[V] | None``, ``labels`` ``[N]`` (int64, all valid),
    ``policy_logit_scale``, ``policy_softcap``, ``ref_logit_scale``, ``ref_softcap`` (float / float | None),
    ``outputs`` (tuple of names from :data:`~trl_tokenpo.kernels.OPTIONAL_OUTPUTS`), ``tile_elements`` (int or
    ``None`` for the backend's default), ``backend`` (``"torch"``, the default, or ``"triton"``; not ``"auto"``),
    ``kl_gradient_rows`` (``(start, end)`` or ``None``, see :func:`fused_token_stats`).

    Outputs: the eight ``[N]`` per-token fields of :class:`~trl_tokenpo.kernels.TokenStats`, in order
    (``policy_logps``, ``ref_logps``, ``forward_kl``, ``reverse_kl``, ``entropy``, ``mean_logits``, ``is_top1``,
    ``log_sum_sq_probs``; ``None`` when not requested).

    Gradients reach ``policy_hidden`` / ``policy_weight`` / ``policy_bias`` from ``policy_logps``, ``forward_kl`` and
    ``reverse_kl``. Per transformed policy logit ``z`` (``p`` = policy, ``q`` = reference probabilities)::

        d logp_y / dz = onehot(y) - p
        d fkl / dz    = p - q
        d rkl / dz    = p * (log p - log q - rkl)

    chained through ``dz/dx = scale * (1 - tanh^2)`` (softcap) or ``scale``. The reference side never receives a
    gradient, even when ``ref_weight`` is the same parameter as ``policy_weight`` (PEFT with adapters disabled).
    Prefer :func:`fused_token_stats`, which also gathers ZeRO-3 / FSDP2 weights and resolves ``backend="auto"``.
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
        tile_elements: int | None,
        backend: str = "torch",
        kl_gradient_rows: tuple[int, int] | None = None,
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
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton' here (resolve 'auto' first); got {backend!r}.")
        kl_rows = (0, num_tokens) if kl_gradient_rows is None else tuple(int(i) for i in kl_gradient_rows)
        if len(kl_rows) != 2 or not 0 <= kl_rows[0] <= kl_rows[1] <= num_tokens:
            raise ValueError(f"kl_gradient_rows must be (start, end) with 0 <= start <= end <= {num_tokens}; got {kl_gradient_rows}.")
        tiles = _tiles(backend)
        tile_elements = tiles.TILE_ELEMENTS if tile_elements is None else tile_elements
        policy_dtype = compute_dtype(policy_hidden)
        ref_dtype = compute_dtype(ref_hidden)
        device = policy_hidden.device

        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            policy = _head(policy_hidden, policy_weight, policy_bias, policy_logit_scale, policy_softcap, policy_dtype)
            ref = _head(ref_hidden, ref_weight, ref_bias, ref_logit_scale, ref_softcap, ref_dtype)
            stats, policy_lse, ref_lse = tiles.forward(
                policy, ref, labels.contiguous(), frozenset(outputs), tile_elements
            )

        needs_ref = ref_lse is not None
        reverse_kl = stats["reverse_kl"]
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
        ctx.tile_elements = tile_elements
        ctx.backend = backend
        ctx.kl_rows = kl_rows
        non_differentiable = ("ref_logps", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
        ctx.mark_non_differentiable(*(stats[name] for name in non_differentiable if stats[name] is not None))
        return tuple(stats[name] for name in PER_TOKEN_FIELDS)

    @staticmethod
    def backward(ctx, grad_logps, _grad_ref_logps, grad_fkl, grad_rkl, *_metric_grads):
        (
            policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels, policy_lse, ref_lse,
            saved_rkl,
        ) = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # One entry per input of `forward` (`backend` may have been left to its default)
        no_grads = (None,) * len(ctx.needs_input_grad)
        if grad_logps is None and grad_fkl is None and grad_rkl is None:
            return no_grads
        if not (need_hidden or need_weight or need_bias):
            return no_grads
        policy_scale, policy_softcap, ref_scale, ref_softcap = ctx.transforms
        policy_dtype, ref_dtype = ctx.dtypes
        needs_ref = grad_fkl is not None or grad_rkl is not None
        device = policy_hidden.device
        gathered = (policy_weight, policy_bias) + ((ref_weight, ref_bias) if needs_ref else ())

        with torch.no_grad(), torch.autocast(device.type, enabled=False), maybe_gather_lm_head_ctx(*gathered):
            policy = _head(policy_hidden, policy_weight, policy_bias, policy_scale, policy_softcap, policy_dtype)
            ref = _head(ref_hidden, ref_weight, ref_bias, ref_scale, ref_softcap, ref_dtype) if needs_ref else None
            # Accumulate in float32 whatever the model dtype
            def zeros(tensor, needed):
                return torch.zeros(tensor.shape, device=tensor.device, dtype=torch.float32) if needed else None

            grad_hidden = zeros(policy_hidden, need_hidden)
            grad_weight = zeros(policy_weight, need_weight)
            grad_bias = zeros(policy_bias, need_bias and policy_bias is not None)
            _tiles(ctx.backend).backward(
                policy,
                ref,
                labels.contiguous(),
                policy_lse,
                ref_lse,
                saved_rkl,
                None if grad_logps is None else grad_logps.float().contiguous(),
                None if grad_fkl is None else grad_fkl.float().contiguous(),
                None if grad_rkl is None else grad_rkl.float().contiguous(),
                grad_hidden,
                grad_weight,
                grad_bias,
                ctx.tile_elements,
                ctx.kl_rows,
            )

        return (
            None if grad_hidden is None else grad_hidden.to(policy_hidden.dtype),
            None if grad_weight is None else grad_weight.to(policy_weight.dtype),
            None if grad_bias is None else grad_bias.to(policy_bias.dtype),
        ) + no_grads[3:]


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
    backend: str = "auto",
    kl_gradient_rows: tuple[int, int] | None = None,
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
        outputs: optional statistics to compute, among :data:`~trl_tokenpo.kernels.OPTIONAL_OUTPUTS`.
        tile_elements: element budget of one logits tile. Default: :data:`~trl_tokenpo.kernels.TILE_ELEMENTS`
            (float32 ``[rows, V]`` tiles) for the torch backend, ``tiles_triton.TILE_ELEMENTS`` (``[rows, columns]``
            tiles in the compute dtype) for Triton.
        backend: ``"auto"`` (Triton on CUDA when ``triton`` is importable, torch elsewhere), ``"torch"`` or
            ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` for tests).
        kl_gradient_rows: optional ``(start, end)``: rows ``start:end`` are the only ones whose ``forward_kl`` /
            ``reverse_kl`` may receive a non-zero gradient, so the backward projects the reference head for them alone
            (TDPO2 stops the gradient of the chosen completions' KL). A promise of the caller, not checked: reading
            the gradients to check it would make the host wait for the device. ``None``: every row.

    Returns:
        :class:`~trl_tokenpo.kernels.TokenStats` of ``[N]`` float32 tensors (``is_top1``: bool), ``None`` for
        statistics not requested. Under autocast the projections run in the autocast dtype and the statistics in
        float32.
    """
    outputs = check_outputs(outputs)
    backend = resolve_backend(backend, policy_hidden.device)
    if tile_elements is not None:
        tile_elements = int(tile_elements)
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
            backend,
            kl_gradient_rows,
        )
    return TokenStats(**dict(zip(PER_TOKEN_FIELDS, results)))
