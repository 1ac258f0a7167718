"""Keep a bitsandbytes 4-bit base model exactly as loaded while the trainers and the estimator use it.

On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` (0.50.2) converts the layer in place to the layout of
its fused CPU kernel the first time the layer runs in eval mode without gradient (evaluation, the estimator's scoring,
any `torch.no_grad()` forward): the packed 4-bit weight is reordered, and the quantization scales (`absmax`) are
replaced by a bfloat16 copy in the kernel's `[in_features / blocksize, out_features]` order. `state_dict()` (a
checkpoint save, an adapter save) converts the weight back but not the scales: they stay rounded to bfloat16 and,
without double quantization, in the kernel's order, which the non-packed code reads as if it were the original one.
From then on every forward, in training and in inference, dequantizes wrong weights in each layer whose rows span more
than one quantization block (in_features > 64, so every real model): the frozen base is silently corrupted. The
kernel also computes in bfloat16 whatever `bnb_4bit_compute_dtype` says, so a reference computed in eval mode would not
match the same model in train mode.

`keep_4bit_layout` turns that conversion off on the model's 4-bit layers (it only exists to speed up CPU inference),
and puts back the layout of layers already converted before the model reached us.
"""

from __future__ import annotations

import torch
from accelerate.logging import get_logger


logger = get_logger(__name__)


def keep_4bit_layout(model: torch.nn.Module | None) -> list[str]:
    """Turn off bitsandbytes' in-place CPU inference conversion on every `Linear4bit` of `model`, and convert back the
    layers it already converted. Returns the names of the layers converted back (their scales keep the bfloat16
    rounding: a warning says so). A no-op for a model without 4-bit layers or without bitsandbytes installed."""
    if model is None:
        return []
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    restored = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _unpack(module.weight, state)
            restored.append(name)
    if restored:
        logger.warning(
            f"{len(restored)} 4-bit layers (e.g. {restored[0]}) had been converted by bitsandbytes for its CPU "
            "inference kernel (an eval-mode forward without gradient on a CPU with AVX512-BF16) before reaching "
            "trl-tokenpo; they were converted back, but their quantization scales keep the bfloat16 rounding of that "
            "conversion. Reload the model for its exact weights."
        )
    return restored


def _unpack(weight: torch.nn.Parameter, state) -> None:
    """Undo `bitsandbytes.functional._convert_weight_packed_for_cpu` on one layer, scales included (bitsandbytes' own
    inverse leaves scales without double quantization in the kernel's transposed order)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    out_features, in_features = state.shape
    nested = state.original_nested
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        blocks = in_features // state.blocksize
        state.absmax = state.absmax.reshape(blocks, out_features).T.reshape(-1).to(torch.float32).contiguous()
    weight.data = data
    weight.quant_state = state
