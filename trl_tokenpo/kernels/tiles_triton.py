"""The Triton backend of the fused token statistics: ``[rows, columns]`` tiles, each folded by ONE kernel.

The projections stay in cuBLAS (``torch.mm`` / ``torch.addmm`` into a buffer in the compute dtype: bf16 under bf16
training, as TRL's fused LM head does). What the torch backend does in about ten float32 passes over a tile is one
hand-written kernel here:

* forward, :func:`_forward_kernel`: one program per token row reads the row of BOTH models' logits tiles once and
  folds it into running (online log-sum-exp) statistics: each model's maximum and sum of exponentials, the label
  logits, and the sums that give the forward KL, the reverse KL, the entropy, ``log sum p^2``, the mean logit and the
  top-1 flag once the whole vocabulary has been seen;
* backward, :func:`_backward_kernel`: one program per (row, block of columns) reads the recomputed logits of the
  policy (and of the reference, for the rows whose KL receives a gradient) and overwrites the policy tile with the
  gradient of the loss with respect to the raw logits, which then feeds the gradient matmuls in the compute dtype with
  float32 accumulation.

A tile spans up to :data:`MAX_ROWS` tokens and as many vocabulary columns as :data:`TILE_ELEMENTS` allows, so the LM
head weights are read once per 4096 tokens and the statistics are exact whatever the vocabulary split.

Without a GPU the same kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before ``triton`` is first imported); that is how the test suite checks them. Without ``triton`` this
module still imports; :func:`available` is then ``False``.
"""

from __future__ import annotations

import math

import torch

from .stats import Head, accumulate_mm


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs nothing of this module
    triton = None
    tl = None


# Element budget of one `[rows, columns]` tile (two live at a time, one per model, in the compute dtype): 4096 x 32768,
# the tile of TRL's fused LM head, i.e. 256 MiB per tile in bf16
TILE_ELEMENTS = 2**27
# Tokens per tile: the LM head weights are read once per this many tokens and direction
MAX_ROWS = 4096
# Columns one program handles at a time (a power of two; smaller when the tile is narrower)
BLOCK_SIZE = 1024

# Rows of the forward's running state, `[_STATE_ROWS, N]` float32 (the kernel addresses them by these numbers)
_P_MAX, _P_SUM, _Q_MAX, _Q_SUM, _P_TARGET, _Q_TARGET = 0, 1, 2, 3, 4, 5
_P_X_SUM, _P_SQ_SUM, _P_Z_SUM, _P_MAX_BEFORE, _P_GAP, _Q_GAP = 6, 7, 8, 9, 10, 11
_STATE_ROWS = 12
# Rows of the backward's per-token inputs, `[6, N]` float32
_LSE_P, _LSE_Q, _G_LP, _G_FKL, _G_RKL, _RKL = 0, 1, 2, 3, 4, 5


def _logits(x, scale, softcap, SOFTCAP: tl.constexpr):
    # The transformed float32 logits: softcap * tanh(scale * x / softcap), or scale * x without softcapping
    z = x.to(tl.float32) * scale
    if SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # tanh(y) = 2 sigmoid(2y) - 1
    return z


def _forward_kernel(
    p_ptr,
    p_stride,
    q_ptr,
    q_stride,
    labels_ptr,
    state_ptr,
    state_stride,
    col_start,
    n_cols,
    p_scale,
    p_softcap,
    q_scale,
    q_softcap,
    P_SOFTCAP: tl.constexpr,
    Q_SOFTCAP: tl.constexpr,
    FKL: tl.constexpr,
    RKL: tl.constexpr,
    ENTROPY: tl.constexpr,
    SQ: tl.constexpr,
    MEAN: tl.constexpr,
    TOP1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per token: fold the columns [col_start, col_start + n_cols) of both models' logits into the running
    # statistics of the token (state rows: see _P_MAX ... _Q_GAP). e_p = exp(z_p - max_p) throughout; every running sum
    # of e_p is rescaled by exp(old max - new max) when the maximum grows.
    p_scale = tl.cast(p_scale, tl.float32)
    p_softcap = tl.cast(p_softcap, tl.float32)
    q_scale = tl.cast(q_scale, tl.float32)
    q_softcap = tl.cast(q_softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * p_stride
    q_row = q_ptr + row * q_stride
    state = state_ptr + row
    p_max = tl.load(state + 0 * state_stride)
    p_sum = tl.load(state + 1 * state_stride)
    q_max = tl.load(state + 2 * state_stride)
    q_sum = tl.load(state + 3 * state_stride)
    p_x_sum = tl.load(state + 6 * state_stride)
    p_sq_sum = tl.load(state + 7 * state_stride)
    p_z_sum = tl.load(state + 8 * state_stride)
    p_max_before = tl.load(state + 9 * state_stride)
    p_gap = tl.load(state + 10 * state_stride)
    q_gap = tl.load(state + 11 * state_stride)
    local = tl.load(labels_ptr + row) - col_start
    for start in range(0, n_cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_cols
        # Transformed logits, 0 on the masked columns
        z_p = _logits(tl.load(p_row + offsets, mask=mask, other=0.0), p_scale, p_softcap, P_SOFTCAP)
        z_q = _logits(tl.load(q_row + offsets, mask=mask, other=0.0), q_scale, q_softcap, Q_SOFTCAP)
        z_p_inf = tl.where(mask, z_p, -float("inf"))
        z_q_inf = tl.where(mask, z_q, -float("inf"))

        new_p_max = tl.maximum(p_max, tl.max(z_p_inf, axis=0))
        p_rescale = tl.exp(p_max - new_p_max)
        e_p = tl.exp(z_p_inf - new_p_max)  # 0 on the masked columns
        p_sum = p_sum * p_rescale + tl.sum(e_p, axis=0)
        new_q_max = tl.maximum(q_max, tl.max(z_q_inf, axis=0))
        q_rescale = tl.exp(q_max - new_q_max)
        e_q = tl.exp(z_q_inf - new_q_max)
        q_sum = q_sum * q_rescale + tl.sum(e_q, axis=0)
        gap = z_p - z_q  # 0 on the masked columns
        if RKL:
            # sum_v e_p (z_p - z_q): reverse KL = gap_p / sum_p - lse_p + lse_q
            p_gap = p_gap * p_rescale + tl.sum(e_p * gap, axis=0)
        if FKL:
            # sum_v e_q (z_q - z_p): forward KL = gap_q / sum_q - lse_q + lse_p
            q_gap = q_gap * q_rescale - tl.sum(e_q * gap, axis=0)
        if ENTROPY:
            p_x_sum = p_x_sum * p_rescale + tl.sum(e_p * z_p, axis=0)
        if SQ:
            p_sq_sum = p_sq_sum * p_rescale * p_rescale + tl.sum(e_p * e_p, axis=0)
        if MEAN:
            p_z_sum += tl.sum(z_p, axis=0)
        if TOP1:
            # `argmax` returns the first maximum: a label tied with an earlier token is not top-1
            p_max_before = tl.maximum(p_max_before, tl.max(tl.where(offsets < local, z_p_inf, -float("inf")), axis=0))
        p_max = new_p_max
        q_max = new_q_max
    tl.store(state + 0 * state_stride, p_max)
    tl.store(state + 1 * state_stride, p_sum)
    tl.store(state + 2 * state_stride, q_max)
    tl.store(state + 3 * state_stride, q_sum)
    if ENTROPY:
        tl.store(state + 6 * state_stride, p_x_sum)
    if SQ:
        tl.store(state + 7 * state_stride, p_sq_sum)
    if MEAN:
        tl.store(state + 8 * state_stride, p_z_sum)
    if TOP1:
        tl.store(state + 9 * state_stride, p_max_before)
    if RKL:
        tl.store(state + 10 * state_stride, p_gap)
    if FKL:
        tl.store(state + 11 * state_stride, q_gap)
    if (local >= 0) & (local < n_cols):
        tl.store(state + 4 * state_stride, _logits(tl.load(p_row + local), p_scale, p_softcap, P_SOFTCAP))
        tl.store(state + 5 * state_stride, _logits(tl.load(q_row + local), q_scale, q_softcap, Q_SOFTCAP))


def _backward_kernel(
    p_ptr,
    p_stride,
    q_ptr,
    q_stride,
    labels_ptr,
    rows_ptr,
    rows_stride,
    col_start,
    n_cols,
    p_scale,
    p_softcap,
    q_scale,
    q_softcap,
    P_SOFTCAP: tl.constexpr,
    Q_SOFTCAP: tl.constexpr,
    LP: tl.constexpr,
    FKL: tl.constexpr,
    RKL: tl.constexpr,
    REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (token, block of columns): overwrite the policy's raw logits x with d loss / d x, where
    #   d loss / d z = g_lp (onehot - p) + g_fkl (p - q) + g_rkl p (log p - log q - rkl)
    # and dz/dx = scale * (1 - tanh^2) with softcapping, else scale (per-token rows: see _LSE_P ... _RKL)
    p_scale = tl.cast(p_scale, tl.float32)
    p_softcap = tl.cast(p_softcap, tl.float32)
    q_scale = tl.cast(q_scale, tl.float32)
    q_softcap = tl.cast(q_softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_cols
    per_row = rows_ptr + row
    p_ptrs = p_ptr + row * p_stride + offsets
    z_p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32) * p_scale
    if P_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * z_p / p_softcap) - 1.0
        z_p = p_softcap * t
    log_p = z_p - tl.load(per_row + 0 * rows_stride)
    p = tl.exp(log_p)
    grad = tl.zeros((BLOCK,), tl.float32)
    if LP:
        is_target = (offsets + col_start) == tl.load(labels_ptr + row)
        grad += tl.load(per_row + 2 * rows_stride) * (is_target.to(tl.float32) - p)
    if REF:
        z_q = _logits(tl.load(q_ptr + row * q_stride + offsets, mask=mask, other=0.0), q_scale, q_softcap, Q_SOFTCAP)
        log_q = z_q - tl.load(per_row + 1 * rows_stride)
        if FKL:
            grad += tl.load(per_row + 3 * rows_stride) * (p - tl.exp(log_q))
        if RKL:
            grad += tl.load(per_row + 4 * rows_stride) * p * (log_p - log_q - tl.load(per_row + 5 * rows_stride))
    if P_SOFTCAP:
        grad = grad * (1.0 - t * t)
    grad = grad * p_scale
    tl.store(p_ptrs, grad.to(p_ptr.dtype.element_ty), mask=mask)


if triton is not None:
    _logits = triton.jit(_logits)
    _forward_kernel = triton.jit(_forward_kernel)
    _backward_kernel = triton.jit(_backward_kernel)


# The oldest Triton releases the kernels are checked with: they compile for sm_90 from 3.3 on (checked without a GPU by
# tests/test_kernels_triton.py::test_kernels_compile_for_hopper_without_a_gpu, run against 3.3 to 3.9), and Triton's
# interpreter runs them on CPU tensors from 3.7 on (before that it cannot take a loop bound that is a kernel argument)
MIN_VERSION = (3, 3)
MIN_INTERPRETER_VERSION = (3, 7)


def version() -> tuple[int, int] | None:
    """``(major, minor)`` of the importable ``triton``, or ``None`` without it."""
    if triton is None:
        return None
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def available() -> bool:
    """Whether ``triton`` is importable, at :data:`MIN_VERSION` or newer (older releases are not checked)."""
    found = version()
    return found is not None and found >= MIN_VERSION


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when ``triton`` was imported), which
    is what lets them run on CPU tensors."""
    return triton is not None and type(_forward_kernel).__name__ == "InterpretedFunction"


def tile_shape(num_tokens: int, vocab_size: int, tile_elements: int) -> tuple[int, int]:
    """``(rows, columns)`` of one tile: up to :data:`MAX_ROWS` tokens, then as many columns as the budget allows."""
    rows = max(1, min(num_tokens, MAX_ROWS, tile_elements))
    return rows, max(1, min(vocab_size, tile_elements // rows))


def _block(columns: int) -> int:
    return min(BLOCK_SIZE, triton.next_power_of_2(columns))


def _project(buffer: torch.Tensor, hidden: torch.Tensor, head: Head, start: int, end: int) -> torch.Tensor:
    """The raw logits ``hidden @ W[start:end].T + b[start:end]`` of one tile, written by cuBLAS into the first
    ``n * (end - start)`` elements of the flat ``buffer`` (so the tile is contiguous however narrow)."""
    tile = buffer[: hidden.shape[0] * (end - start)].view(hidden.shape[0], end - start)
    weight = head.weight[start:end].t()
    if head.bias is None:
        torch.mm(hidden, weight, out=tile)
    else:
        torch.addmm(head.bias[start:end], hidden, weight, out=tile)
    return tile


def _transform_args(policy: Head, ref: Head) -> dict:
    return {
        "p_scale": policy.scale,
        "p_softcap": policy.softcap or 1.0,
        "q_scale": ref.scale,
        "q_softcap": ref.softcap or 1.0,
        "P_SOFTCAP": policy.softcap is not None,
        "Q_SOFTCAP": ref.softcap is not None,
    }


def forward(
    policy: Head, ref: Head, labels: torch.Tensor, want: frozenset[str], tile_elements: int
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`.tiles_torch.forward`."""
    num_tokens, vocab_size = policy.hidden.shape[0], policy.weight.shape[0]
    device = policy.hidden.device
    rows, columns = tile_shape(num_tokens, vocab_size, tile_elements)
    state = torch.zeros(_STATE_ROWS, num_tokens, device=device, dtype=torch.float32)
    for row in (_P_MAX, _Q_MAX, _P_MAX_BEFORE):  # row by row: a list index would be copied from the host
        state[row].fill_(-math.inf)
    flags = {
        "FKL": "forward_kl" in want,
        "RKL": "reverse_kl" in want,
        "ENTROPY": "entropy" in want,
        "SQ": "log_sum_sq_probs" in want,
        "MEAN": "mean_logits" in want,
        "TOP1": "is_top1" in want,
        "BLOCK": _block(columns),
        **_transform_args(policy, ref),
    }
    if num_tokens > 0:
        p_buffer = torch.empty(rows * columns, device=device, dtype=policy.dtype)
        q_buffer = torch.empty(rows * columns, device=device, dtype=ref.dtype)
    for start in range(0, num_tokens, rows):
        end = min(start + rows, num_tokens)
        h_pol = policy.hidden[start:end].to(policy.dtype)
        h_ref = ref.hidden[start:end].to(ref.dtype)
        for col in range(0, vocab_size, columns):
            col_end = min(col + columns, vocab_size)
            p_tile = _project(p_buffer, h_pol, policy, col, col_end)
            q_tile = _project(q_buffer, h_ref, ref, col, col_end)
            _forward_kernel[(end - start,)](
                p_tile,
                p_tile.stride(0),
                q_tile,
                q_tile.stride(0),
                labels[start:end],
                state[:, start:end],
                state.stride(0),
                col,
                col_end - col,
                **flags,
            )

    p_max, p_sum, q_max, q_sum, p_target, q_target, p_x_sum, p_sq_sum, p_z_sum, p_max_before, p_gap, q_gap = state
    policy_lse = p_max + torch.log(p_sum)
    ref_lse = q_max + torch.log(q_sum)
    stats = {
        "policy_logps": p_target - policy_lse,
        "ref_logps": q_target - ref_lse,
        "forward_kl": q_gap / q_sum - ref_lse + policy_lse if flags["FKL"] else None,
        "reverse_kl": p_gap / p_sum - policy_lse + ref_lse if flags["RKL"] else None,
        "entropy": policy_lse - p_x_sum / p_sum if flags["ENTROPY"] else None,
        "mean_logits": p_z_sum / vocab_size if flags["MEAN"] else None,
        "is_top1": (p_target >= p_max) & (p_target > p_max_before) if flags["TOP1"] else None,
        "log_sum_sq_probs": torch.log(p_sq_sum) - 2.0 * torch.log(p_sum) if flags["SQ"] else None,
    }
    return stats, policy_lse, (ref_lse if flags["FKL"] or flags["RKL"] else None)


def backward(
    policy: Head,
    ref: Head | None,
    labels: torch.Tensor,
    policy_lse: torch.Tensor,
    ref_lse: torch.Tensor | None,
    reverse_kl: torch.Tensor | None,
    g_lp: torch.Tensor | None,
    g_fkl: torch.Tensor | None,
    g_rkl: torch.Tensor | None,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    tile_elements: int,
    kl_rows: tuple[int, int] | None = None,
) -> None:
    """Same contract as :func:`.tiles_torch.backward`.

    The reference's logits are recomputed only for the rows ``kl_rows`` whose forward or reverse KL can have a non-zero
    gradient (TDPO2 detaches the chosen side's KL, so about half of them; the caller knows which from the host, so
    nothing is read back from the device): the rows before and after them are processed without any reference
    projection.
    """
    num_tokens, vocab_size = policy.hidden.shape[0], policy.weight.shape[0]
    if num_tokens == 0:
        return
    device = policy.hidden.device
    rows, columns = tile_shape(num_tokens, vocab_size, tile_elements)
    per_row = torch.zeros(6, num_tokens, device=device, dtype=torch.float32)
    for index, value in ((_LSE_P, policy_lse), (_LSE_Q, ref_lse), (_G_LP, g_lp), (_G_FKL, g_fkl), (_G_RKL, g_rkl),
                         (_RKL, reverse_kl)):
        if value is not None:
            per_row[index] = value

    p_hidden, r_hidden = policy.hidden, None if ref is None else ref.hidden
    kl_start, kl_end = (0, num_tokens) if kl_rows is None else kl_rows
    if g_fkl is None and g_rkl is None:
        kl_start = kl_end = num_tokens

    args = {"LP": g_lp is not None, "BLOCK": _block(columns), **_transform_args(policy, ref or policy)}
    p_buffer = torch.empty(rows * columns, device=device, dtype=policy.dtype)
    q_buffer = torch.empty(rows * columns, device=device, dtype=ref.dtype) if kl_end > kl_start else None
    spans = ((0, kl_start, False), (kl_start, kl_end, True), (kl_end, num_tokens, False))
    for first, last, with_ref in spans:
        flags = {"FKL": with_ref and g_fkl is not None, "RKL": with_ref and g_rkl is not None, "REF": with_ref}
        for start in range(first, last, rows):
            end = min(start + rows, last)
            h_pol = p_hidden[start:end].to(policy.dtype)
            h_ref = r_hidden[start:end].to(ref.dtype) if with_ref else None
            for col in range(0, vocab_size, columns):
                col_end = min(col + columns, vocab_size)
                tile = _project(p_buffer, h_pol, policy, col, col_end)
                q_tile = _project(q_buffer, h_ref, ref, col, col_end) if with_ref else tile
                _backward_kernel[(end - start, triton.cdiv(col_end - col, args["BLOCK"]))](
                    tile,
                    tile.stride(0),
                    q_tile,
                    q_tile.stride(0),
                    labels[start:end],
                    per_row[:, start:end],
                    per_row.stride(0),
                    col,
                    col_end - col,
                    **flags,
                    **args,
                )
                # `tile` now holds the gradient of the raw logits, in the compute dtype
                if grad_bias is not None:
                    grad_bias[col:col_end] += tile.sum(0, dtype=torch.float32)
                if grad_hidden is not None:
                    accumulate_mm(grad_hidden[start:end], tile, policy.weight[col:col_end])
                if grad_weight is not None:
                    accumulate_mm(grad_weight[col:col_end], tile.t(), h_pol)
