"""Small statistics for benchmark results over a few training seeds. Pure Python (no scipy), deterministic.

- :func:`mean_ci`: the mean of per-seed values with a Student-t confidence interval (``n - 1`` degrees of freedom).
- :func:`paired_difference`: the mean over shared seeds of ``a[seed] - b[seed]`` with its t-interval (a paired test:
  two methods trained with the same seed see the same batches in the same order).
- :func:`interpolate_at`: the value of a trajectory (KL, reward points in training order) where it first reaches a
  given KL, by linear interpolation between the two checkpoints around it; ``None`` outside the trajectory (no
  extrapolation).
- :func:`wilson_interval`: the Wilson score interval of a proportion (an accuracy over ``n`` held-out pairs).
- :func:`student_t_quantile` / :func:`normal_quantile`: the quantiles these use.

Example::

    from trl_tokenpo.stats import interpolate_at, mean_ci

    mean_ci([0.41, 0.47, 0.39])  # Interval(mean=0.4233, half_width=0.1034, n=3): 0.42 +- 0.10 (t, 2 dof)
    interpolate_at([(0.0, 0.25), (0.6, 0.30), (1.4, 0.42)], 1.0)  # 0.36: halfway between the checkpoints around KL 1
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


__all__ = [
    "Interval",
    "interpolate_at",
    "mean_ci",
    "normal_quantile",
    "paired_difference",
    "student_t_cdf",
    "student_t_quantile",
    "wilson_interval",
]


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz), valid for
    ``x < (a + 1) / (a + b + 2)``."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        # even step, then odd step of the fraction's coefficients
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def _regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t distribution with ``dof`` degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"dof must be positive, got {dof}.")
    tail = 0.5 * _regularized_beta(dof / (dof + t * t), dof / 2.0, 0.5)  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def _invert(cdf, p: float, low: float, high: float) -> float:
    """The x in [low, high] with cdf(x) = p, by bisection (cdf increasing)."""
    for _ in range(200):
        middle = 0.5 * (low + high)
        if cdf(middle) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


def student_t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``dof`` degrees of freedom (e.g. ``p = 0.975``,
    ``dof = 2`` gives 4.303, the factor of a two-sided 95 % interval over three seeds)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}.")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, dof)
    high = 1.0
    while student_t_cdf(high, dof) < p:
        high *= 2.0
    return _invert(lambda t: student_t_cdf(t, dof), p, 0.0, high)


def normal_quantile(p: float) -> float:
    """The ``p`` quantile of the standard normal distribution (1.960 for ``p = 0.975``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}.")
    return _invert(lambda z: 0.5 * math.erfc(-z / math.sqrt(2.0)), p, -40.0, 40.0)


@dataclass(frozen=True)
class Interval:
    """A mean and the half width of its confidence interval: ``mean +- half_width``.

    Attributes:
        mean: the mean of the values (NaN when there are none).
        half_width: ``t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (``n - 1`` in the
            denominator); NaN when ``n < 2``.
        n: how many values went in.
    """

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval (False when the interval is undefined)."""
        return math.isfinite(self.half_width) and not self.low <= value <= self.high

    def to_dict(self) -> dict:
        return {"mean": self.mean, "half_width": self.half_width, "n": self.n}


def mean_ci(values: Iterable, level: float = 0.95) -> Interval:
    """Mean of ``values`` (``None`` and NaN left out) with a two-sided Student-t confidence interval.

    The interval is ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)``, with ``s`` the sample standard deviation: it treats
    the values (one per training seed) as independent draws from the distribution of the outcome over seeds.
    """
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, float("nan"), 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, student_t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n), n)


def paired_difference(a: Mapping, b: Mapping, level: float = 0.95) -> Interval:
    """``a[k] - b[k]`` over the keys (seeds) where both values exist and are finite, with :func:`mean_ci`'s interval."""
    shared = [k for k in a if k in b and _finite([a[k]]) and _finite([b[k]])]
    return mean_ci([float(a[k]) - float(b[k]) for k in shared], level)


def interpolate_at(trajectory: Sequence[tuple[float, float]], x: float) -> float | None:
    """The y of a trajectory where its x first reaches ``x``.

    ``trajectory`` lists ``(x, y)`` points in training order (for a frontier: sampled KL and reward at each
    checkpoint, starting with the untrained model at KL 0). The first segment between consecutive points that contains
    ``x`` is interpolated linearly; a point exactly at ``x`` is returned as it is. When no segment reaches ``x`` (the
    trajectory stays below it, or starts above it), the result is ``None``: nothing is extrapolated.
    """
    points = [(float(px), float(py)) for px, py in trajectory]
    for i, (px, py) in enumerate(points):
        if px == x:
            return py
        if i + 1 < len(points):
            qx, qy = points[i + 1]
            if (px - x) * (qx - x) < 0:
                return py + (qy - py) * (x - px) / (qx - px)
    return None


def wilson_interval(proportion: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion observed on ``n`` independent trials (for example the
    preference accuracy on ``n`` held-out pairs). ``proportion`` may be a mean over seeds of such proportions."""
    if n <= 0 or not math.isfinite(proportion):
        return float("nan"), float("nan")
    z = normal_quantile((1.0 + level) / 2.0)
    denominator = 1.0 + z * z / n
    center = (proportion + z * z / (2 * n)) / denominator
    spread = z * math.sqrt(proportion * (1.0 - proportion) / n + z * z / (4 * n * n)) / denominator
    return center - spread, center + spread
