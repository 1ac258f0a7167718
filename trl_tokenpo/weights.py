"""Token rewards to TIS-DPO importance weights, as pure functions.

The contrastive estimator gives every completion token a reward `r_t = log pi_plus(y_t | s_t) - log pi_minus(y_t | s_t)`
(positive: the "good" model prefers the token). A transform turns those rewards into importance weights `w_t >= 0`. The
transforms work on ONE completion at a time (a 1-D tensor of its rewards) and know which side of the pair it is: a
token of a chosen response gets a large weight when its reward is high, a token of a rejected response when its
reward is low. They are applied to the whole tokenized completion, before any `max_length` truncation, so a token's
weight does not depend on where a batch happens to cut the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


WEIGHT_TRANSFORMS = ("exp", "rank", "threshold_scale")
REWARD_DENOISERS = ("none", "center", "soft_threshold")
SIDES = ("chosen", "rejected")
# Scale factor that turns the median absolute deviation into a standard deviation for Gaussian noise.
MAD_TO_STD = 1.482602218505602


@dataclass(frozen=True)
class WeightTransform:
    """Settings of the reward-to-weight transform (see `TISDPOConfig` for their meaning)."""

    transform: str = "exp"
    mu: float = 1.0
    k: float = 1.0
    clamp: tuple[float, float] = (-0.5, 1.5)
    rank_range: tuple[float, float] = (0.7, 1.3)
    scale_range: tuple[float, float] = (0.7, 1.3)
    scale_threshold: float = 1.5
    normalize: bool = False
    denoise: str = "none"
    denoise_threshold: float = 2.0

    def __post_init__(self):
        if self.transform not in WEIGHT_TRANSFORMS:
            raise ValueError(f"Unknown weight transform {self.transform!r}; expected one of {WEIGHT_TRANSFORMS}.")
        if self.denoise not in REWARD_DENOISERS:
            raise ValueError(f"Unknown reward denoiser {self.denoise!r}; expected one of {REWARD_DENOISERS}.")
        if self.denoise_threshold < 0:
            raise ValueError(f"`denoise_threshold` must be >= 0; got {self.denoise_threshold}.")
        for name in ("clamp", "rank_range", "scale_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"`{name}` must be an increasing pair (low, high); got {getattr(self, name)}.")
        if self.k <= 0:
            raise ValueError(f"The weight scale `k` must be positive; got {self.k}.")
        if min(self.rank_range) < 0 or min(self.scale_range) < 0:
            raise ValueError("`rank_range` and `scale_range` must be non-negative: importance weights cannot be negative.")
        if self.scale_threshold <= 0:
            raise ValueError(f"`scale_threshold` must be positive; got {self.scale_threshold}.")

    def __call__(self, rewards: torch.Tensor, side: str) -> torch.Tensor:
        return rewards_to_weights(rewards, side, self)


def signed_rewards(rewards: torch.Tensor, side: str) -> torch.Tensor:
    """`+r` on a chosen completion, `-r` on a rejected one: larger means "this token explains the preference"."""
    if side == "chosen":
        return rewards
    if side == "rejected":
        return -rewards
    raise ValueError(f"`side` must be one of {SIDES}; got {side!r}.")


def exp_weights(rewards: torch.Tensor, side: str, mu: float = 1.0, k: float = 1.0, clamp=(-0.5, 1.5)) -> torch.Tensor:
    """The paper's Eq. 19: `w_t = k * exp(mu * clamp(r_t, L, U))`, with `+mu` on chosen and `-mu` on rejected tokens.

    With the defaults, chosen weights lie in `[exp(-0.5), exp(1.5)] = [0.61, 4.48]` and rejected weights in
    `[exp(-1.5), exp(0.5)] = [0.22, 1.65]`.

    Args:
        rewards (`torch.Tensor`): `(T,)` token rewards of one completion.
        side (`str`): `"chosen"` or `"rejected"`.
        mu (`float`): magnitude of the exponent's slope.
        k (`float`): overall scale.
        clamp (`tuple[float, float]`): `(L, U)` bounds applied to the raw reward before the sign.

    Returns:
        `torch.Tensor`: `(T,)` float32 weights.
    """
    sign = 1.0 if side == "chosen" else -1.0
    signed_rewards(rewards, side)  # validates `side`
    low, high = clamp
    return k * torch.exp(sign * mu * rewards.to(torch.float32).clamp(low, high))


def rank_weights(rewards: torch.Tensor, side: str, weight_range=(0.7, 1.3)) -> torch.Tensor:
    """The released code's rank transform: rank the signed rewards of one completion and map ranks linearly onto
    `weight_range`. Ties share their average rank, so the mean weight is exactly the middle of the range (1 by
    default). A one-token completion gets the middle of the range.

    Args:
        rewards (`torch.Tensor`): `(T,)` token rewards of one completion.
        side (`str`): `"chosen"` or `"rejected"`.
        weight_range (`tuple[float, float]`): weights of the lowest and the highest rank.

    Returns:
        `torch.Tensor`: `(T,)` float32 weights.
    """
    signed = signed_rewards(rewards.to(torch.float64), side)
    low, high = weight_range
    n = signed.numel()
    if n <= 1:
        return torch.full_like(signed, (low + high) / 2, dtype=torch.float32)
    # Average rank of each value: (number of smaller values) + (number of equal values - 1) / 2
    smaller = (signed.unsqueeze(0) < signed.unsqueeze(1)).sum(dim=1).to(torch.float64)
    equal = (signed.unsqueeze(0) == signed.unsqueeze(1)).sum(dim=1).to(torch.float64)
    rank = smaller + (equal - 1) / 2
    return (low + (high - low) * rank / (n - 1)).to(torch.float32)


def threshold_scale_weights(rewards: torch.Tensor, side: str, threshold=1.5, weight_range=(0.7, 1.3)) -> torch.Tensor:
    """Clamp the signed reward to `[-threshold, threshold]` and map it linearly onto `weight_range` (0 maps to the
    middle of the range).

    Args:
        rewards (`torch.Tensor`): `(T,)` token rewards of one completion.
        side (`str`): `"chosen"` or `"rejected"`.
        threshold (`float`): clamp bound of the signed reward.
        weight_range (`tuple[float, float]`): weights at `-threshold` and `+threshold`.

    Returns:
        `torch.Tensor`: `(T,)` float32 weights.
    """
    signed = signed_rewards(rewards.to(torch.float32), side).clamp(-threshold, threshold)
    low, high = weight_range
    return low + (high - low) * (signed + threshold) / (2 * threshold)


def denoise_rewards(rewards: torch.Tensor, method: str = "soft_threshold", threshold: float = 2.0) -> torch.Tensor:
    """Remove what looks like estimation noise from one completion's token rewards, before the weight transform.

    Most tokens of a completion carry no preference (the true token reward is sparse), so most estimated rewards are
    noise around a per-completion offset. With `d_t = r_t - median(r)`:

    - `"center"`: `d_t` (the completion's offset removed: a reward says how a token stands out from its own
      completion, not how the contrastive pair rates the completion as a whole);
    - `"soft_threshold"`: `sign(d_t) * max(|d_t| - threshold * sigma, 0)`, with the robust noise scale
      `sigma = 1.4826 * median(|d|)` (median absolute deviation, the standard deviation for Gaussian noise). Tokens
      within `threshold` noise deviations of the median get reward 0 (weight `k` under `exp`); the others are shrunk
      toward 0 by the same amount (soft thresholding, the classic denoiser of a sparse signal in noise);
    - `"none"`: `r_t` unchanged.

    Args:
        rewards (`torch.Tensor`): `(T,)` token rewards of one completion.
        method (`str`): `"none"`, `"center"` or `"soft_threshold"`.
        threshold (`float`): for `"soft_threshold"`, the dead zone's half-width in robust standard deviations.

    Returns:
        `torch.Tensor`: `(T,)` float32 rewards (an empty completion is returned unchanged).
    """
    if method not in REWARD_DENOISERS:
        raise ValueError(f"Unknown reward denoiser {method!r}; expected one of {REWARD_DENOISERS}.")
    rewards = rewards.to(torch.float32)
    if method == "none" or rewards.numel() == 0:
        return rewards
    values = rewards.to(torch.float64)
    centered = values - _median(values)
    if method == "soft_threshold":
        sigma = MAD_TO_STD * _median(centered.abs())
        centered = centered.sign() * (centered.abs() - threshold * sigma).clamp_min(0.0)
    return centered.to(torch.float32)


def _median(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-D tensor, the mean of the two middle values for an even count (torch.median takes the
    lower one)."""
    ordered = values.sort().values
    n = ordered.numel()
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def normalize_mean_one(weights: torch.Tensor) -> torch.Tensor:
    """Rescale one completion's weights to mean 1 (all-zero weights are returned unchanged)."""
    mean = weights.mean()
    return weights / mean if mean > 0 else weights


def rewards_to_weights(rewards: torch.Tensor, side: str, settings: WeightTransform) -> torch.Tensor:
    """Apply the configured denoiser, transform and optional mean-one normalization to one completion's rewards.

    Args:
        rewards (`torch.Tensor`): `(T,)` token rewards `r_t`.
        side (`str`): `"chosen"` or `"rejected"`.
        settings (`WeightTransform`): the transform and its parameters.

    Returns:
        `torch.Tensor`: `(T,)` float32 weights, all `>= 0`.
    """
    rewards = denoise_rewards(rewards, settings.denoise, settings.denoise_threshold)
    if settings.transform == "exp":
        weights = exp_weights(rewards, side, settings.mu, settings.k, settings.clamp)
    elif settings.transform == "rank":
        weights = rank_weights(rewards, side, settings.rank_range)
    else:
        weights = threshold_scale_weights(rewards, side, settings.scale_threshold, settings.scale_range)
    return normalize_mean_one(weights) if settings.normalize else weights
