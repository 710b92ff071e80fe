"""The statistics the rules judge with, in pure Python (math.lgamma, math.erfc; no scipy).

Guarantee: every tail probability here is an exact sum of probability masses (binomial,
Poisson, negative binomial) or a closed form (normal), so a rule's p-value can be checked
by hand. It defends against judging a small sample by its point value: one failed call
among twenty reads as 95% success, yet says almost nothing about a 99% target.

Tails are summed from the asked count outwards and stop once the terms no longer change
the sum, so the cost is a few standard deviations' worth of terms, not ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

_TINY = 1e-17
_MAX_TERMS = 200_000


def norm_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def norm_quantile(p: float) -> float:
    """The z with P(Z <= z) = p (bisection on erfc: exact to 1e-12, fast enough per rule load)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1.0 - norm_sf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


_T_CACHE: dict[tuple[float, float], float] = {}


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection; cached: rules ask for a few (p, df) pairs)."""
    key = (p, df)
    if (hit := _T_CACHE.get(key)) is not None:
        return hit
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got {p}, {df}")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1.0 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    _T_CACHE[key] = out = (lo + hi) / 2
    return out


def wilson_bounds(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n; ``z`` one-sided (2.326 for 99%)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - margin), min(1.0, centre + margin)


def _upper_tail(logpmf: Callable[[int], float], k: int, mode: int, top: int | None) -> float:
    """sum_{i >= k} exp(logpmf(i)) for a unimodal mass function with the given mode."""
    if k <= 0:
        return 1.0
    if top is not None and k > top:
        return 0.0
    if k > mode:
        total = 0.0
        i = k
        while top is None or i <= top:
            term = math.exp(logpmf(i))
            total += term
            if term <= _TINY * total or i - k > _MAX_TERMS:
                break
            i += 1
        return min(1.0, total)
    below = 0.0  # 1 - P(X <= k - 1), summed downwards from k - 1
    i = k - 1
    while i >= 0:
        term = math.exp(logpmf(i))
        below += term
        if (i < mode and term <= _TINY * below) or k - i > _MAX_TERMS:
            break
        i -= 1
    return min(1.0, max(0.0, 1.0 - below))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    c = math.lgamma(n + 1)

    def logpmf(i: int) -> float:
        return c - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq

    return _upper_tail(logpmf, k, int((n + 1) * p), n)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_sf(k + 1, n, p) if k < n else 1.0


def betabinom_sf(k: int, n: int, a: float, b: float) -> float:
    """P(X >= k) for X ~ BetaBinomial(n, a, b): a binomial whose share is itself uncertain,
    Beta(a, b) (e.g. a baseline of ``a - 0.5`` errors in ``a + b - 1`` calls, Jeffreys)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    c = math.lgamma(n + 1) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) - math.lgamma(n + a + b)

    def logpmf(i: int) -> float:
        return c - math.lgamma(i + 1) - math.lgamma(n - i + 1) + math.lgamma(i + a) + math.lgamma(n - i + b)

    mode = int(n * max(0.0, a - 1) / max(1e-12, a + b - 2)) if a > 1 and b > 1 else (0 if a <= 1 else n)
    return _upper_tail(logpmf, k, min(mode, n), n)


def betabinom_cdf(k: int, n: int, a: float, b: float) -> float:
    """P(X <= k) for X ~ BetaBinomial(n, a, b)."""
    return 1.0 - betabinom_sf(k + 1, n, a, b) if k < n else 1.0


def poisson_sf(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam)."""
    if k <= 0:
        return 1.0
    if lam <= 0.0:
        return 0.0
    ll = math.log(lam)

    def logpmf(i: int) -> float:
        return i * ll - lam - math.lgamma(i + 1)

    return _upper_tail(logpmf, k, int(lam), None)


def poisson_cdf(k: int, lam: float) -> float:
    """P(X <= k) for X ~ Poisson(lam)."""
    return 1.0 - poisson_sf(k + 1, lam)


def count_sf(k: int, mean: float, var: float) -> float:
    """P(X >= k) for a count with this mean and variance: negative binomial when the
    variance exceeds the mean (overdispersed traffic), Poisson otherwise."""
    if var <= mean * (1 + 1e-9) or mean <= 0.0:
        return poisson_sf(k, mean)
    r = mean * mean / (var - mean)
    p = r / (r + mean)  # success probability; mean = r (1 - p) / p
    lp, lq = math.log(p), math.log1p(-p)
    c = math.lgamma(r)

    def logpmf(i: int) -> float:
        return math.lgamma(i + r) - c - math.lgamma(i + 1) + r * lp + i * lq

    mode = int((r - 1) * (1 - p) / p) if r > 1 else 0
    return _upper_tail(logpmf, k, mode, None)


def count_cdf(k: int, mean: float, var: float) -> float:
    """P(X <= k) for the count of ``count_sf``."""
    return 1.0 - count_sf(k + 1, mean, var)


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of nothing")
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def mad_sigma(values: Sequence[float], centre: float | None = None) -> float:
    """The median absolute deviation scaled to a normal sigma (x 1.4826); 0 for < 3 values.
    ``centre``: the values' median when the caller has it already."""
    if len(values) < 3:
        return 0.0
    m = median(values) if centre is None else centre
    return 1.4826 * median([abs(v - m) for v in values])
