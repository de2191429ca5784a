"""Claim verdicts shared by every study: paired per-seed differences and a 95% Student t-interval.

The rule (stated in each study's README and ``results.md``):

* For a comparison "A beats B" the study pairs the runs by seed (same data, same subset, same
  noise draw, same initialisation seed) and takes the per-seed differences ``d_k = A_k − B_k``,
  oriented so that a positive difference supports the claim.
* The 95% interval is ``mean(d) ± t_{0.975, n−1} · sd(d) / √n`` (Student t, ``n`` seeds).
* The comparison reads **YES** when the whole interval is above 0, **NO** when it is below 0,
  **INCONCLUSIVE** when it contains 0, or when there is only one seed (no interval).
* A claim made of several comparisons (several sizes, rivals or conditions) reads YES when every
  comparison reads YES, NO when at least one reads NO, and INCONCLUSIVE otherwise
  (:func:`combine`). The intervals are not adjusted for the number of comparisons.

No scipy: the t quantile comes from the closed-form CDF of Student's t for integer degrees of
freedom (Abramowitz & Stegun 26.7.3–4) and bisection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

YES, NO, INCONCLUSIVE = "YES", "NO", "INCONCLUSIVE"
LEVEL = 0.95
RULE = (
    "Verdicts: per-seed paired differences (same seeds, data and noise draws for both sides), "
    "mean and 95% Student t-interval over seeds; YES if the interval lies above 0, NO if below 0, "
    "INCONCLUSIVE if it contains 0 or there is one seed. A claim of several comparisons is YES if "
    "all are YES, NO if any is NO, else INCONCLUSIVE (no multiple-comparison correction)."
)


def t_two_sided_coverage(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` (integer ≥ 1) degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            total *= s * math.cos(theta)
        return 2 / math.pi * (theta + total)
    total, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The ``t`` with ``P(|T| <= t) = level`` (e.g. 12.706 for df 1, 2.262 for df 9 at 95%)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_two_sided_coverage(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_coverage(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def verdict(low: float | None, high: float | None) -> str:
    """YES above 0, NO below 0, INCONCLUSIVE otherwise (or without an interval)."""
    if low is None or high is None:
        return INCONCLUSIVE
    if low > 0:
        return YES
    if high < 0:
        return NO
    return INCONCLUSIVE


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Per-seed differences ``a[k] − b[k]`` (same order), their mean, sd, t-interval and verdict."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}: pair them by seed first")
    return interval([x - y for x, y in zip(a, b, strict=True)], level)


def interval(diffs: Iterable[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean, sd, ``level`` t-interval and verdict of per-seed differences (positive: the claim)."""
    d = [float(x) for x in diffs]
    if any(not math.isfinite(x) for x in d):
        raise ValueError(f"interval: non-finite difference in {d}")
    n = len(d)
    if n == 0:
        raise ValueError("interval: no differences")
    mean = math.fsum(d) / n
    if n == 1:
        return {
            "n": 1,
            "mean": mean,
            "sd": None,
            "low": None,
            "high": None,
            "level": level,
            "diffs": d,
            "verdict": INCONCLUSIVE,
        }
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "low": low,
        "high": high,
        "level": level,
        "diffs": d,
        "verdict": verdict(low, high),
    }


def combine(verdicts: Iterable[str]) -> str:
    """YES if every verdict is YES, NO if any is NO, else INCONCLUSIVE (also for none)."""
    v = list(verdicts)
    if not v:
        return INCONCLUSIVE
    if NO in v:
        return NO
    if all(x == YES for x in v):
        return YES
    return INCONCLUSIVE


def fmt(iv: dict[str, Any], digits: int = 3, pct: bool = False) -> str:
    """``+0.174 [+0.121, +0.227]`` (or ``+0.174 (one seed: no interval)``)."""

    def f(x: float) -> str:
        return f"{100 * x:+.{max(digits - 2, 1)}f}%" if pct else f"{x:+.{digits}f}"

    if iv["low"] is None:
        return f"{f(iv['mean'])} (one seed: no interval)"
    return f"{f(iv['mean'])} [{f(iv['low'])}, {f(iv['high'])}]"
