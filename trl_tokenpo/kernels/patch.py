"""The model patch: ``model(..., token_stats=request)`` runs the backbone and returns fused token statistics.

:func:`add_token_stats_head` patches a transformers causal LM so that, with a :class:`TokenStatsRequest`, its forward
returns either the reference's hidden states at the scored positions (reference mode, no LM head projection) or the
per-token statistics of :func:`~trl_tokenpo.kernels.fused_token_stats` (policy mode). Everything happens inside
``forward``, so PEFT, DDP, DeepSpeed and gradient checkpointing wrap it as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from contextlib import nullcontext

import torch

from .function import fused_token_stats
from .stats import PER_TOKEN_FIELDS, TokenStats, check_outputs


_IGNORE_INDEX = -100


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
        positions: ``[N]`` int64, the flat indices of the scored positions in ``mask`` (row-major), the rows of
            ``hidden``.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    mask: torch.Tensor
    positions: torch.Tensor


@dataclasses.dataclass
class TokenStatsRequest:
    """The ``token_stats`` keyword of a model patched by :func:`add_token_stats_head`.

    Attributes:
        labels: ``[B, T]`` int64, unshifted like the input ids (position ``t`` predicts ``labels[:, t + 1]``), ``-100``
            on positions that are not scored.
        reference: ``None`` for reference mode, or the :class:`ReferenceHidden` a reference-mode call returned (on the
            same inputs and labels) for policy mode.
        outputs: optional statistics to compute in policy mode, among
            :data:`~trl_tokenpo.kernels.OPTIONAL_OUTPUTS`.
        tile_elements: tile budget override (default: the backend's, see
            :func:`~trl_tokenpo.kernels.fused_token_stats`).
        backend: ``"auto"`` (Triton on CUDA when ``triton`` is importable, else torch), ``"torch"`` or ``"triton"``.
        positions: optional ``[N]`` int64 flat indices (row-major in ``[B, T-1]``) of the scored positions, i.e. of
            ``labels[:, 1:] != -100``, as the caller knows them from the host (e.g.
            :attr:`trl_tokenpo.data.BatchLayout.index`). ``None``: found with ``nonzero`` on the labels, which makes the host
            wait for the device on CUDA. Pass the same tensor in the reference-mode and the policy-mode request.
        kl_gradient_rows: optional ``(start, end)``: the scored positions ``positions[start:end]`` are the only ones
            whose ``forward_kl`` / ``reverse_kl`` can receive a non-zero gradient (TDPO2 detaches the chosen
            completions' KL, which come first), so the backward recomputes the reference's logits only for them.
            A promise of the caller: gradients of the other positions' KL are not read. ``None``: all positions.
    """

    labels: torch.Tensor
    reference: ReferenceHidden | None = None
    outputs: tuple[str, ...] = ("forward_kl",)
    tile_elements: int | None = None
    backend: str = "auto"
    positions: torch.Tensor | None = None
    kl_gradient_rows: tuple[int, int] | None = None


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
    positions = request.positions
    if positions is None:  # found on the device: the host waits for it
        positions = mask.reshape(-1).nonzero().squeeze(1)
    positions = positions.to(weight.device, non_blocking=True)
    # Gathered by index, not by boolean mask: the number of rows is the index's length, known on the host
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * (T-1), H]
    logit_scale, softcap = logit_transform_from_config(self.config)

    if not policy_mode:
        return ReferenceHidden(
            hidden=flat_hidden.index_select(0, positions).detach(), weight=weight, bias=bias, logit_scale=logit_scale,
            softcap=softcap, mask=mask, positions=positions,
        )  # fmt: skip

    reference = request.reference
    # Compared on shapes only (host metadata): the caller passes one request's labels and positions to both calls
    if reference.mask.shape != mask.shape or reference.positions.shape != positions.shape:
        raise ValueError(
            f"The reference was computed on other scored positions ({reference.positions.shape[0]} in a "
            f"{tuple(reference.mask.shape)} batch) than the policy's labels ({positions.shape[0]} in "
            f"{tuple(mask.shape)})."
        )
    stats = fused_token_stats(
        flat_hidden.index_select(0, positions),
        weight,
        bias,
        reference.hidden.to(weight.device),
        reference.weight,
        reference.bias,
        labels.reshape(-1).index_select(0, positions),
        policy_logit_scale=logit_scale,
        policy_softcap=softcap,
        ref_logit_scale=reference.logit_scale,
        ref_softcap=reference.softcap,
        outputs=check_outputs(request.outputs),
        tile_elements=request.tile_elements,
        backend=request.backend,
        kl_gradient_rows=request.kl_gradient_rows,
    )
    # Scattered back by index (`index_copy` keeps the outputs connected to the graph even when no position is scored)
    per_position = {}
    for name in PER_TOKEN_FIELDS:
        value = getattr(stats, name)
        if value is not None:
            value = value.new_zeros(mask.numel()).index_copy(0, positions, value).view(mask.shape)
        per_position[name] = value

    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _load_balancing_loss(
            self, text_config, backbone_outputs.router_logits, kwargs.get("attention_mask")
        )
    return TokenStats(**per_position, label_mask=mask, aux_loss=aux_loss)


def add_token_stats_head(model: torch.nn.Module) -> None:
    """Patch a transformers causal LM so that ``model(..., token_stats=request)`` returns fused token statistics.

    Without ``token_stats`` (or with ``token_stats=None``) the previous forward runs unchanged, so generation and
    TRL's ``fused_lm_head=True`` path (:func:`trl.trainer.utils.add_fused_lm_head`, applied before or after this) keep
    working. With a :class:`TokenStatsRequest`:

    * ``request.reference is None`` (reference mode): only the backbone runs, under ``torch.no_grad()``; returns a
      :class:`ReferenceHidden` with the hidden states at the scored positions and the LM head parameters. No LM head
      projection happens.
    * otherwise (policy mode): the backbone runs, and the policy and reference heads are projected together in tiles
      by :func:`fused_token_stats`; returns a :class:`~trl_tokenpo.kernels.TokenStats` of ``[B, T-1]`` tensors.

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
