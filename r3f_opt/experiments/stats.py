"""The statistics ``r3f-report`` prints next to its table: Welch's t-test, a bootstrap confidence interval
of the difference of means, Holm's correction over the tasks of one report, and the number of seeds per
arm needed to detect the paper's effect at the measured seed spread."""
from __future__ import annotations

import math
import random
import statistics
from typing import Optional, Sequence

__all__ = ["welch", "bootstrap_ci", "holm", "seeds_needed", "PAPER_EFFECT"]

# R3F - standard++ in the paper (RoBERTa-large, GLUE dev, medians of 10 seeds), in metric units (0..1).
PAPER_EFFECT = {"rte": 0.010, "mrpc": 0.021, "cola": 0.022}


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[dict]:
    """Welch's t-test of mean(b) - mean(a): ``{"diff", "t", "df", "p"}``; None with fewer than 2 per arm.

    Both arms without spread (every seed the same value, e.g. a model that never leaves the majority class):
    equal means give ``p = 1``; different means give ``p = None``, no test, since there is no spread to test
    against (the limit p = 0 would call two seeds per arm a certainty)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(b) - statistics.fmean(a)
    if va + vb == 0:
        return {"diff": diff, "t": math.copysign(math.inf, diff) if diff else 0.0, "df": None,
                "p": None if diff else 1.0}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"diff": diff, "t": t, "df": df, "p": t_two_sided_p(t, df)}


def bootstrap_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, n: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(b) - mean(a), each arm resampled with replacement."""
    rng = random.Random(seed)
    diffs = sorted(statistics.fmean(rng.choices(b, k=len(b))) - statistics.fmean(rng.choices(a, k=len(a)))
                   for _ in range(n))
    lo = diffs[int(math.floor((1 - level) / 2 * (n - 1)))]
    hi = diffs[int(math.ceil((1 + level) / 2 * (n - 1)))]
    return lo, hi


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def t_quantile(q: float, df: float) -> float:
    """The upper-tail quantile of Student's t: ``t`` with ``P(T >= t) = q``, for ``0 < q <= 0.5``."""
    if not 0 < q <= 0.5:
        raise ValueError(f"q must be in (0, 0.5], got {q}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 2 * q:  # P(|T| >= t) = 2 P(T >= t)
        hi *= 2
    for _ in range(100):  # bisection: t_two_sided_p falls monotonically in t
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * q else (lo, mid)
    return (lo + hi) / 2


def seeds_needed(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> Optional[int]:
    """Seeds per arm (at least 2) for a two-sided two-sample t-test at ``alpha`` to detect ``effect`` with
    ``power``: n = 2 (t_{1-alpha/2} + t_{power})^2 sd^2 / effect^2 with t on 2n - 2 degrees of freedom,
    iterated from the normal approximation (which underestimates small n)."""
    if not effect or not sd:  # no spread measured: nothing to size the test with
        return None
    z = statistics.NormalDist()
    ratio = 2 * sd ** 2 / effect ** 2
    n = max(2, math.ceil(ratio * (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) ** 2))
    while True:
        df = 2 * n - 2
        need = max(2, math.ceil(ratio * (t_quantile(alpha / 2, df) + t_quantile(1 - power, df)) ** 2))
        if need <= n:
            return n
        n = need
