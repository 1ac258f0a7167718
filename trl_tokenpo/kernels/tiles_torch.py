"""The torch backend of the fused token statistics: ``[rows, V]`` tiles folded by torch operations.

Works on every device. Each tile holds the full vocabulary, so the log-softmax of a tile is exact in one go; the cost
is about ten float32 passes over each tile per direction (a few temporaries of the tile's size), which is cheap next
to the projection on a CPU and memory-bound on a GPU, where :mod:`.tiles_triton` folds each tile in one kernel.

Both functions run without autograd (under ``torch.no_grad()``, autocast off); :class:`.function.TokenStatsFunction`
calls them and owns the gradient bookkeeping.
"""

from __future__ import annotations

import torch

from .stats import TILE_ELEMENTS, Head, accumulate_mm  # noqa: F401  (TILE_ELEMENTS: this backend's default)


def rows_per_tile(vocab_size: int, tile_elements: int) -> int:
    return max(1, tile_elements // max(1, vocab_size))


def project(
    hidden: torch.Tensor,  # [n, H], compute dtype
    weight: torch.Tensor,  # [V, H], compute dtype
    bias: torch.Tensor | None,  # [V], compute dtype
    logit_scale: float,
    softcap: float | None,
    with_derivative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | float | None]:
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


def forward(
    policy: Head, ref: Head, labels: torch.Tensor, want: frozenset[str], tile_elements: int
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, torch.Tensor | None]:
    """Every requested statistic, ``[N]`` each, and the per-row log-partition functions the backward reuses.

    Returns ``(stats, policy_lse, ref_lse)``: ``stats`` maps the names of
    :data:`~trl_tokenpo.kernels.stats.PER_TOKEN_FIELDS` to tensors (``None`` when not requested); ``ref_lse`` is
    ``None`` when no KL was requested.
    """
    num_tokens, vocab_size = policy.hidden.shape[0], policy.weight.shape[0]
    device = policy.hidden.device
    rows = rows_per_tile(vocab_size, tile_elements)

    def empty(dtype=torch.float32):
        return torch.empty(num_tokens, device=device, dtype=dtype)

    policy_logps, ref_logps = empty(), empty()
    forward_kl = empty() if "forward_kl" in want else None
    reverse_kl = empty() if "reverse_kl" in want else None
    entropy = empty() if "entropy" in want else None
    mean_logits = empty() if "mean_logits" in want else None
    is_top1 = empty(torch.bool) if "is_top1" in want else None
    log_sum_sq_probs = empty() if "log_sum_sq_probs" in want else None
    # Per-row log-partition functions, kept for the backward: it then turns each recomputed tile into log-probs by one
    # in-place subtraction instead of a second log-softmax (three passes over the tile and a new buffer)
    policy_lse = empty()
    ref_lse = empty() if forward_kl is not None or reverse_kl is not None else None

    for start in range(0, num_tokens, rows):
        end = min(start + rows, num_tokens)
        target = labels[start:end].unsqueeze(-1)  # [n, 1]
        z_pol, _ = project(
            policy.hidden[start:end].to(policy.dtype), policy.weight, policy.bias, policy.scale, policy.softcap
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
        z_ref, _ = project(ref.hidden[start:end].to(ref.dtype), ref.weight, ref.bias, ref.scale, ref.softcap)
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

    stats = {
        "policy_logps": policy_logps,
        "ref_logps": ref_logps,
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "entropy": entropy,
        "mean_logits": mean_logits,
        "is_top1": is_top1,
        "log_sum_sq_probs": log_sum_sq_probs,
    }
    return stats, policy_lse, ref_lse


def backward(
    policy: Head,
    ref: Head | None,
    labels: torch.Tensor,  # [N]
    policy_lse: torch.Tensor,  # [N]
    ref_lse: torch.Tensor | None,  # [N]
    reverse_kl: torch.Tensor | None,  # [N], the forward's per-row reverse KL
    g_lp: torch.Tensor | None,  # [N] float32 gradient of policy_logps
    g_fkl: torch.Tensor | None,  # [N] float32 gradient of forward_kl
    g_rkl: torch.Tensor | None,  # [N] float32 gradient of reverse_kl
    grad_hidden: torch.Tensor | None,  # [N, H] float32 accumulator, or None
    grad_weight: torch.Tensor | None,  # [V, H] float32 accumulator, or None
    grad_bias: torch.Tensor | None,  # [V] float32 accumulator, or None
    tile_elements: int,
    kl_rows: tuple[int, int] | None = None,
) -> None:
    """Accumulate the gradients of ``sum(g_lp * policy_logps + g_fkl * forward_kl + g_rkl * reverse_kl)`` with respect
    to the policy's hidden states, LM head weight and bias into the float32 accumulators. ``ref`` is needed (not
    ``None``) when ``g_fkl`` or ``g_rkl`` is given. ``kl_rows = (start, end)``: ``g_fkl`` / ``g_rkl`` are zero outside
    these rows (the caller's promise), so a tile with none of them skips the reference's projection."""
    num_tokens, vocab_size = policy.hidden.shape[0], policy.weight.shape[0]
    device = policy.hidden.device
    rows = rows_per_tile(vocab_size, tile_elements)
    kl_start, kl_end = (0, num_tokens) if kl_rows is None else kl_rows
    kl_grads = (g_fkl, g_rkl)

    for start in range(0, num_tokens, rows):
        end = min(start + rows, num_tokens)
        # A tile that straddles `kl_rows` keeps the KL terms of all its rows (zero outside): same tiles, same sums
        g_fkl, g_rkl = kl_grads if start < kl_end and end > kl_start else (None, None)
        needs_ref = g_fkl is not None or g_rkl is not None
        h_pol = policy.hidden[start:end].to(policy.dtype)  # [n, H]
        z_pol, dz_dx = project(h_pol, policy.weight, policy.bias, policy.scale, policy.softcap, with_derivative=True)
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
            z_ref, _ = project(ref.hidden[start:end].to(ref.dtype), ref.weight, ref.bias, ref.scale, ref.softcap)
            lp_ref = z_ref.sub_(ref_lse[start:end].unsqueeze(-1))  # [n, V]
            del z_ref
        if g_rkl is not None:
            log_ratio = lp_pol.sub_(lp_ref)  # lp_pol is not needed any more: reuse its storage
            coef -= g_rkl[start:end] * reverse_kl[start:end]
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
        grad_x = grad_x.to(policy.dtype)
        if grad_hidden is not None:
            accumulate_mm(grad_hidden[start:end], grad_x, policy.weight)
        if grad_weight is not None:
            accumulate_mm(grad_weight, grad_x.t(), h_pol)
