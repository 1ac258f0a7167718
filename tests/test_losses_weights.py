"""The formulas of losses.py and weights.py against independent float64 computations written from methods.md."""

import math

import pytest
import torch

from trl_tokenpo import losses
from trl_tokenpo.weights import (
    WeightTransform,
    exp_weights,
    normalize_mean_one,
    rank_weights,
    rewards_to_weights,
    threshold_scale_weights,
)


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _pairs(gen, b=3):
    lr = torch.randn(2 * b, generator=gen, dtype=torch.float64)
    fkl = torch.rand(2 * b, generator=gen, dtype=torch.float64) * 3
    return lr, fkl


def test_preference_loss_matches_formula():
    z = torch.tensor([-2.0, 0.0, 0.7, 5.0], dtype=torch.float64)
    got = losses.preference_loss(z, beta=0.3)
    want = [-_logsig(0.3 * v) for v in z.tolist()]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_margin_values_and_gradients(variant):
    gen = torch.Generator().manual_seed(0)
    lr, fkl = _pairs(gen)
    lr.requires_grad_(True)
    fkl.requires_grad_(True)
    alpha = 0.7
    z = losses.tdpo_margin(lr, fkl, variant, alpha)
    b = lr.numel() // 2
    lr_w, lr_l, kl_w, kl_l = lr[:b], lr[b:], fkl[:b], fkl[b:]
    if variant == "tdpo1":
        want = (lr_w - lr_l) - (kl_l - kl_w)
    else:
        want = (lr_w - lr_l) - alpha * (kl_l - kl_w.detach())
    torch.testing.assert_close(z, want)
    z.sum().backward()
    grad_kl = fkl.grad
    if variant == "tdpo1":
        torch.testing.assert_close(grad_kl, torch.cat([torch.ones(b), -torch.ones(b)]).double())
    else:  # the chosen KL gets no gradient, the rejected KL gets -alpha
        torch.testing.assert_close(grad_kl, torch.cat([torch.zeros(b), -alpha * torch.ones(b)]).double())


def test_tdpo2_alpha_zero_is_dpo():
    gen = torch.Generator().manual_seed(1)
    lr, fkl = _pairs(gen)
    torch.testing.assert_close(losses.tdpo_margin(lr, fkl, "tdpo2", 0.0), losses.dpo_margin(lr))


def test_tisdpo_margins():
    gen = torch.Generator().manual_seed(2)
    lrw, fklw = _pairs(gen)
    rklw = torch.rand(lrw.shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    fklw.requires_grad_(True)
    b = lrw.numel() // 2
    torch.testing.assert_close(losses.tisdpo_margin(lrw, "none"), lrw[:b] - lrw[b:])
    z = losses.tisdpo_margin(lrw, "reverse", 0.4, weighted_reverse_kl=rklw)
    torch.testing.assert_close(z, lrw[:b] - lrw[b:] - 0.4 * (rklw[:b] - rklw[b:]))
    z.sum().backward()  # the reverse term has no stop-gradient: both sides get a gradient
    torch.testing.assert_close(rklw.grad, torch.cat([-0.4 * torch.ones(b), 0.4 * torch.ones(b)]).double())
    z = losses.tisdpo_margin(lrw, "tdpo", 0.4, weighted_forward_kl=fklw)
    torch.testing.assert_close(z, losses.tdpo_margin(lrw, fklw, "tdpo2", 0.4))
    with pytest.raises(ValueError, match="weighted_forward_kl"):
        losses.tisdpo_margin(lrw, "tdpo", 0.4)
    with pytest.raises(ValueError, match="Unknown"):
        losses.tisdpo_margin(lrw, "forward")


def test_masked_sum_ignores_masked_nan_and_weights():
    x = torch.tensor([[1.0, float("nan"), 2.0], [3.0, 4.0, float("inf")]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    w = torch.tensor([[2.0, 5.0, 0.5], [1.0, 0.0, 9.0]])
    torch.testing.assert_close(losses.masked_sum(x, mask), torch.tensor([3.0, 7.0]))
    torch.testing.assert_close(losses.masked_sum(x, mask, w), torch.tensor([3.0, 3.0]))


def test_length_desensitized_weights_match_trl_definition():
    # pair 0: chosen 3 tokens, rejected 5 tokens -> the rejected's last 2 tokens are tail
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    w = losses.length_desensitized_weights(mask, 0.25)
    torch.testing.assert_close(w, torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 0.25, 0.25, 0]], dtype=torch.float32))


def test_wpo_weights_formula():
    gen = torch.Generator().manual_seed(3)
    logps = -torch.rand(4, 5, generator=gen)
    lssp = -torch.rand(4, 5, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    seq = [math.exp(sum((logps[i, t] - lssp[i, t]).item() for t in range(5) if mask[i, t]) / mask[i].sum().item()) for i in range(4)]
    torch.testing.assert_close(losses.wpo_weights(logps, lssp, mask), torch.tensor([seq[0] * seq[2], seq[1] * seq[3]]))


# ---------------------------------------------------------------------------------------------------------------
# weights.py
# ---------------------------------------------------------------------------------------------------------------


def test_exp_weights_signs_and_clamp():
    r = torch.tensor([-3.0, -0.5, 0.0, 0.3, 1.5, 9.0])
    clamped = [max(-0.5, min(1.5, v)) for v in r.tolist()]
    torch.testing.assert_close(exp_weights(r, "chosen"), torch.tensor([math.exp(v) for v in clamped]))
    torch.testing.assert_close(exp_weights(r, "rejected", mu=2.0, k=0.5), torch.tensor([0.5 * math.exp(-2 * v) for v in clamped]))
    chosen = exp_weights(torch.linspace(-10, 10, 101), "chosen")
    rejected = exp_weights(torch.linspace(-10, 10, 101), "rejected")
    assert math.isclose(chosen.min().item(), math.exp(-0.5), rel_tol=1e-6) and math.isclose(chosen.max().item(), math.exp(1.5), rel_tol=1e-6)
    assert math.isclose(rejected.min().item(), math.exp(-1.5), rel_tol=1e-6) and math.isclose(rejected.max().item(), math.exp(0.5), rel_tol=1e-6)


def test_rank_weights_mean_one_and_order():
    gen = torch.Generator().manual_seed(4)
    for n in (1, 2, 7, 50):
        r = torch.randn(n, generator=gen)
        for side in ("chosen", "rejected"):
            w = rank_weights(r, side)
            assert math.isclose(w.mean().item(), 1.0, rel_tol=1e-6)
            assert w.min() >= 0.7 - 1e-6 and w.max() <= 1.3 + 1e-6
            if n > 1:
                signed = r if side == "chosen" else -r
                assert torch.equal(torch.argsort(w), torch.argsort(signed))
                assert math.isclose(w.max().item(), 1.3, rel_tol=1e-6) and math.isclose(w.min().item(), 0.7, rel_tol=1e-6)
    ties = rank_weights(torch.tensor([1.0, 1.0, 2.0, 0.0]), "chosen")
    torch.testing.assert_close(ties, torch.tensor([1.0, 1.0, 1.3, 0.7]))


def test_threshold_scale_weights():
    r = torch.tensor([-3.0, -1.5, 0.0, 0.75, 1.5, 4.0])
    torch.testing.assert_close(threshold_scale_weights(r, "chosen"), torch.tensor([0.7, 0.7, 1.0, 1.15, 1.3, 1.3]))
    torch.testing.assert_close(threshold_scale_weights(r, "rejected"), torch.tensor([1.3, 1.3, 1.0, 0.85, 0.7, 0.7]))


def test_normalization_and_dispatch():
    r = torch.tensor([0.2, -1.0, 3.0])
    w = rewards_to_weights(r, "chosen", WeightTransform(normalize=True))
    assert math.isclose(w.mean().item(), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(w, normalize_mean_one(exp_weights(r, "chosen")))
    torch.testing.assert_close(WeightTransform(transform="rank")(r, "rejected"), rank_weights(r, "rejected"))
    with pytest.raises(ValueError, match="Unknown weight transform"):
        WeightTransform(transform="softmax")
    with pytest.raises(ValueError, match="increasing"):
        WeightTransform(clamp=(1.0, -1.0))
    with pytest.raises(ValueError, match="side"):
        exp_weights(r, "both")


def _dense_denoise(values, method, threshold):
    """float64 reference of `denoise_rewards`, written from its docstring with numpy (median, MAD)."""
    import numpy as np

    r = np.asarray(values, dtype=np.float64)
    if method == "none" or r.size == 0:
        return r
    d = r - np.median(r)
    if method == "soft_threshold":
        sigma = 1.482602218505602 * np.median(np.abs(d))
        d = np.sign(d) * np.maximum(np.abs(d) - threshold * sigma, 0.0)
    return d


@pytest.mark.parametrize("method", ["none", "center", "soft_threshold"])
@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_denoise_rewards_matches_dense_float64(method, n):
    from trl_tokenpo.weights import denoise_rewards

    gen = torch.Generator().manual_seed(n)
    # sparse signal (a few large rewards) on noise around an offset, as a DPO-based estimate looks
    r = 0.3 + 0.5 * torch.randn(n, generator=gen)
    r[: max(1, n // 6)] += 3.0
    for threshold in (0.0, 1.0, 2.0):
        got = denoise_rewards(r, method, threshold)
        assert got.dtype == torch.float32 and got.shape == r.shape
        want = torch.from_numpy(_dense_denoise(r.tolist(), method, threshold)).float()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_soft_threshold_zeroes_the_noise_band_and_keeps_the_outliers():
    from trl_tokenpo.weights import denoise_rewards

    r = torch.tensor([0.1, -0.1, 0.2, -0.2, 0.0, 0.15, -0.15, 3.0, -2.5])
    out = denoise_rewards(r, "soft_threshold", 2.0)
    assert torch.count_nonzero(out[:7]) == 0  # within 2 robust deviations of the median
    assert out[7] > 2.0 and out[8] < -1.5  # the outliers survive, shrunk toward 0 by the same amount
    torch.testing.assert_close(out[7] - 3.0, -(out[8] + 2.5))
    # the exp transform then gives the neutral tokens weight k exactly
    w = rewards_to_weights(r, "chosen", WeightTransform(denoise="soft_threshold"))
    torch.testing.assert_close(w[:7], torch.ones(7))
    assert w[7] > 1.0 and w[8] < 1.0


def test_denoise_settings_are_validated_and_reach_the_transform():
    with pytest.raises(ValueError, match="reward denoiser"):
        WeightTransform(denoise="median")
    with pytest.raises(ValueError, match="denoise_threshold"):
        WeightTransform(denoise="soft_threshold", denoise_threshold=-1.0)
    r = torch.tensor([0.4, 0.5, 0.6, 2.0])
    centered = rewards_to_weights(r, "rejected", WeightTransform(denoise="center"))
    torch.testing.assert_close(centered, exp_weights(r - 0.55, "rejected"))
