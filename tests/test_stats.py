"""trl_tokenpo.stats against hand computations and published quantiles."""

from __future__ import annotations

import math

import pytest

from trl_tokenpo.stats import (
    Interval,
    interpolate_at,
    mean_ci,
    normal_quantile,
    paired_difference,
    student_t_cdf,
    student_t_quantile,
    wilson_interval,
)


@pytest.mark.parametrize(
    "dof, expected",  # two-sided 95 % factors, t_{0.975, dof}, from any t table
    [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451), (9, 2.2621572), (29, 2.0452296)],
)
def test_t_quantile_matches_the_table(dof, expected):
    assert student_t_quantile(0.975, dof) == pytest.approx(expected, abs=1e-6)
    assert student_t_quantile(0.025, dof) == pytest.approx(-expected, abs=1e-6)


def test_t_cdf_closed_forms():
    # dof 1 is the Cauchy distribution, dof 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_quantile(0.975, 10_000) == pytest.approx(normal_quantile(0.975), abs=1e-3)
    assert normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="p must lie"):
        student_t_quantile(1.0, 3)


def test_mean_ci_by_hand():
    # values 0.41, 0.47, 0.39: mean 0.42333, s^2 = (0.013333^2 + 0.046667^2 + 0.033333^2) / 2 = 0.00173333,
    # half width = 4.3026527 * sqrt(0.00173333 / 3) = 0.103423
    ci = mean_ci([0.41, 0.47, 0.39])
    assert ci.n == 3 and ci.mean == pytest.approx(0.423333, abs=1e-6)
    assert ci.half_width == pytest.approx(0.103423, abs=1e-6)
    assert ci.low == pytest.approx(0.423333 - 0.103423, abs=1e-6) and ci.excludes(0.0) and not ci.excludes(0.5)
    # None / NaN are left out; one value has no interval; none has no mean
    one = mean_ci([0.3, None, float("nan")])
    assert one.n == 1 and one.mean == 0.3 and math.isnan(one.half_width) and not one.excludes(0.0)
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)
    assert mean_ci([2.0, 2.0]) == Interval(2.0, 0.0, 2)
    # 90 % interval of two values 1 and 3: s = sqrt(2), t_{0.95, 1} = 6.3137515, half width = 6.3137515 * sqrt(2)/sqrt(2)
    assert mean_ci([1.0, 3.0], level=0.90).half_width == pytest.approx(6.3137515, abs=1e-6)


def test_paired_difference_uses_shared_seeds_only():
    a = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.9}
    b = {0: 0.40, 1: 0.45, 2: 0.50, 4: 0.1, 5: None}
    d = paired_difference(a, b)
    # differences 0.10, 0.15, 0.05: mean 0.10, s = 0.05, half width = 4.3026527 * 0.05 / sqrt(3) = 0.124207
    assert d.n == 3 and d.mean == pytest.approx(0.10) and d.half_width == pytest.approx(0.124207, abs=1e-6)
    assert not d.excludes(0.0)  # 0.10 +- 0.12: not significant with three seeds


def test_interpolate_at_first_crossing_without_extrapolation():
    trajectory = [(0.0, 0.25), (0.4, 0.28), (1.2, 0.40), (0.9, 0.45), (3.0, 0.55)]
    assert interpolate_at(trajectory, 0.4) == 0.28  # exactly at a checkpoint
    assert interpolate_at(trajectory, 1.0) == pytest.approx(0.28 + 0.12 * 0.6 / 0.8)  # first crossing: 0.37
    assert interpolate_at(trajectory, 2.0) == pytest.approx(0.45 + 0.10 * 1.1 / 2.1)
    assert interpolate_at(trajectory, 3.0) == 0.55
    assert interpolate_at(trajectory, 4.0) is None  # beyond the last checkpoint: missing, not extrapolated
    assert interpolate_at([(0.5, 0.3), (2.0, 0.5)], 0.2) is None  # before the first point
    assert interpolate_at([], 1.0) is None


def test_wilson_interval_by_hand():
    # p = 0.6, n = 61, z = 1.959964: centre (0.6 + z^2/122) / (1 + z^2/61) = 0.594076,
    # spread z sqrt(0.24/61 + z^2/14884) / (1 + z^2/61) = 0.119389
    low, high = wilson_interval(0.6, 61)
    assert low == pytest.approx(0.594076 - 0.119389, abs=1e-5) and high == pytest.approx(0.594076 + 0.119389, abs=1e-5)
    low, high = wilson_interval(1.0, 10)
    assert high == pytest.approx(1.0) and 0.65 < low < 0.75  # never above 1
    assert all(math.isnan(v) for v in wilson_interval(0.5, 0))
