"""The objectives of trl_tokenpo as pure tensor functions.

This module is the only place where a formula of `methods.md` lives. Nothing here knows about a Trainer, a model or
a dataset: every function takes per-token or per-sequence tensors and returns tensors, so each one can be checked
against an independent dense computation.

Conventions (TRL's): a batch holds `B` preference pairs stacked as `[chosen; rejected]`, i.e. `2B` rows. After the
usual shift, position `t` of a row predicts label `y_t`; `mask[i, t]` is 1 on the completion tokens the loss scores.
Per-token tensors have shape `(2B, T)`, per-sequence tensors `(2B,)`, per-pair tensors `(B,)`. Subscripts `w` / `l`
below are the chosen / rejected row of a pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


TDPO_VARIANTS = ("tdpo1", "tdpo2")
TIS_KL_TERMS = ("none", "reverse", "tdpo")


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum a per-token statistic over the scored positions of each row.

    Args:
        per_token (`torch.Tensor`): `(2B, T)` statistic, e.g. the token log-ratio `lr_t`.
        mask (`torch.Tensor`): `(2B, T)` 0/1 mask of scored positions.
        weights (`torch.Tensor`, *optional*): `(2B, T)` per-token weights `w_t` (no gradient is taken through them).

    Returns:
        `torch.Tensor`: `(2B,)` float32 sums `sum_t m_t [w_t] x_t`.
    """
    factor = mask.to(torch.float32)
    if weights is not None:
        factor = factor * weights.detach().to(torch.float32)
    # `where` rather than a product keeps a NaN/inf at a masked-out position from leaking into the sum
    return torch.where(factor != 0, per_token.to(torch.float32) * factor, 0.0).sum(dim=-1)


def split_pairs(per_sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a `(2B, ...)` tensor stacked as `[chosen; rejected]` into its `(B, ...)` chosen and rejected halves."""
    chosen, rejected = per_sequence.chunk(2, dim=0)
    return chosen, rejected


def preference_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """The logistic preference loss of DPO (TRL's `loss_type="sigmoid"`) applied to a margin `z`:
    `loss = -log sigmoid(beta * z)`.

    Args:
        margin (`torch.Tensor`): `(B,)` margin `z` of each pair.
        beta (`float`): inverse temperature.

    Returns:
        `torch.Tensor`: `(B,)` per-pair loss.
    """
    return -F.logsigmoid(beta * margin)


def dpo_margin(logratio: torch.Tensor) -> torch.Tensor:
    """DPO's margin `z = LR_w - LR_l` from the `(2B,)` sequence log-ratios `LR = sum_t m_t lr_t`; returns `(B,)`."""
    chosen, rejected = split_pairs(logratio)
    return chosen - rejected


def tdpo_margin(logratio: torch.Tensor, forward_kl: torch.Tensor, variant: str, alpha: float) -> torch.Tensor:
    """TDPO's margin (Zeng et al., 2024).

    - `"tdpo1"`: `z = (LR_w - LR_l) - (FKL_l - FKL_w)`
    - `"tdpo2"`: `z = (LR_w - LR_l) - alpha * (FKL_l - sg(FKL_w))`, the gradient of the CHOSEN KL stopped.

    Args:
        logratio (`torch.Tensor`): `(2B,)` sequence log-ratios `LR`.
        forward_kl (`torch.Tensor`): `(2B,)` sequence forward KLs `FKL = sum_t m_t KL(pi_ref || pi_theta)(s_t)`.
        variant (`str`): `"tdpo1"` or `"tdpo2"`.
        alpha (`float`): weight of the KL term; used by `"tdpo2"` only.

    Returns:
        `torch.Tensor`: `(B,)` margins.
    """
    kl_chosen, kl_rejected = split_pairs(forward_kl)
    if variant == "tdpo1":
        return dpo_margin(logratio) - (kl_rejected - kl_chosen)
    if variant == "tdpo2":
        return dpo_margin(logratio) - alpha * (kl_rejected - kl_chosen.detach())
    raise ValueError(f"Unknown TDPO variant {variant!r}; expected one of {TDPO_VARIANTS}.")


def tisdpo_margin(
    weighted_logratio: torch.Tensor,
    kl_term: str,
    alpha: float = 0.0,
    weighted_forward_kl: torch.Tensor | None = None,
    weighted_reverse_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIS-DPO's margin (Liu et al., 2025): `z = (LRw_w - LRw_l) - eta`, with token-weighted sums `LRw = sum_t m_t w_t lr_t`.

    `eta` by `kl_term`:
    - `"none"`: `0` (the released code's default and the paper's "w.o. eta" ablation).
    - `"reverse"`: `alpha * (RKLw_w - RKLw_l)` (the paper's Eq. 16, penalising the chosen response's reverse KL).
    - `"tdpo"`: `alpha * (FKLw_l - sg(FKLw_w))` (TDPO2's term with token weights).

    Args:
        weighted_logratio (`torch.Tensor`): `(2B,)` weighted sequence log-ratios `LRw`.
        kl_term (`str`): one of `"none"`, `"reverse"`, `"tdpo"`.
        alpha (`float`): weight of the KL term.
        weighted_forward_kl (`torch.Tensor`, *optional*): `(2B,)` `FKLw`, required for `"tdpo"`.
        weighted_reverse_kl (`torch.Tensor`, *optional*): `(2B,)` `RKLw`, required for `"reverse"`.

    Returns:
        `torch.Tensor`: `(B,)` margins.
    """
    margin = dpo_margin(weighted_logratio)
    if kl_term == "none":
        return margin
    if kl_term == "reverse":
        if weighted_reverse_kl is None:
            raise ValueError('`kl_term="reverse"` needs `weighted_reverse_kl`.')
        kl_chosen, kl_rejected = split_pairs(weighted_reverse_kl)
        return margin - alpha * (kl_chosen - kl_rejected)
    if kl_term == "tdpo":
        if weighted_forward_kl is None:
            raise ValueError('`kl_term="tdpo"` needs `weighted_forward_kl`.')
        kl_chosen, kl_rejected = split_pairs(weighted_forward_kl)
        return margin - alpha * (kl_rejected - kl_chosen.detach())
    raise ValueError(f"Unknown TIS-DPO KL term {kl_term!r}; expected one of {TIS_KL_TERMS}.")


def length_desensitized_weights(mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """Per-token multipliers of LD-DPO (TRL's `ld_alpha`).

    Within a pair, the first `min(len_w, len_l)` completion tokens of each row count fully and the tail of the longer
    completion counts `ld_alpha`. Multiplying a per-token log-ratio by these weights and summing gives exactly TRL's
    `shared + ld_alpha * tail` sequence log-probability.

    Args:
        mask (`torch.Tensor`): `(2B, T)` 0/1 completion mask.
        ld_alpha (`float`): weight of the tail tokens.

    Returns:
        `torch.Tensor`: `(2B, T)` float32 multipliers, 0 outside the mask.
    """
    position = mask.cumsum(dim=1)
    lengths = mask.sum(dim=1)
    chosen_len, rejected_len = split_pairs(lengths)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    in_mask = mask.bool()
    weights = torch.where(position <= shared, 1.0, float(ld_alpha))
    return torch.where(in_mask, weights, 0.0).to(torch.float32)


def wpo_weights(policy_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-pair weights of WPO (TRL's `use_weighting`, Eq. 2 of https://huggingface.co/papers/2406.11827).

    Each sequence gets `exp(mean_t (log p(y_t) - log sum_v p(v)^2))` over its completion tokens; a pair's weight is
    the product of its two sequences' weights. No gradient flows through the weights.

    Args:
        policy_logps (`torch.Tensor`): `(2B, T)` policy label log-probabilities.
        log_sum_sq_probs (`torch.Tensor`): `(2B, T)` `log sum_v pi_theta(v | s_t)^2`.
        mask (`torch.Tensor`): `(2B, T)` 0/1 completion mask.

    Returns:
        `torch.Tensor`: `(B,)` weights.
    """
    with torch.no_grad():
        lengths = mask.sum(dim=1).clamp_min(1)
        mean = masked_sum(policy_logps - log_sum_sq_probs, mask) / lengths
        chosen, rejected = split_pairs(torch.exp(mean))
        return chosen * rejected
