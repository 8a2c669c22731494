"""Intervals, ratios and verdicts: the one statistics module of the benchmarks and the evaluations.

Every figure a target is judged on is an `Estimate` with its 95% interval; `verdict` says met
(True) or missed (False) only when the whole interval is on one side of the threshold, and n/a
(None) when the interval straddles it or the noise is unknown. A load level is a dict as
bench.loadgen's LevelResult writes it (ok, ramp_requests, p50_ms, p95_ms, mean_ms, captions_per_s).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z95 = 1.96  # two-sided 95% normal quantile
P95_SIGMAS = 1.645  # normal approximation: a latency distribution's sigma from its p50 and p95
VERDICT_WORDS = {True: "MET", False: "MISSED", None: "n/a"}


@dataclass(frozen=True)
class Estimate:
    """A measured figure with its 95% interval; low/high None: its noise is unknown."""

    value: float
    low: float | None = None
    high: float | None = None

    @classmethod
    def around(cls, value: float, half_width: float | None) -> "Estimate":
        return cls(value) if half_width is None else cls(value, value - half_width, value + half_width)

    def text(self, digits: int = 2, unit: str = "") -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}{unit} (spread unknown)"
        return f"{self.value:.{digits}f}{unit} [95% CI {self.low:.{digits}f} to {self.high:.{digits}f}]"


def verdict(estimate: Estimate | None, threshold: float, higher_is_better: bool) -> bool | None:
    """True (met) / False (missed) only when the whole 95% interval is on one side of the
    threshold; None (n/a) when it straddles it, or its noise is unknown, or nothing was measured."""
    if estimate is None or estimate.low is None or estimate.high is None:
        return None
    good_side = (lambda x: x >= threshold) if higher_is_better else (lambda x: x < threshold)
    ends = {good_side(estimate.low), good_side(estimate.high)}
    return ends.pop() if len(ends) == 1 else None


def t95(df: int) -> float:
    """Two-sided 95% Student t quantile (the normal one from 30 degrees of freedom)."""
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
             12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06}
    if df >= 30:
        return Z95
    return table[max(k for k in table if k <= df)] if df >= 1 else math.inf


def welch_difference(a: Sequence[float], b: Sequence[float]) -> Estimate | None:
    """mean(a) - mean(b) with a Welch 95% interval (None below two samples on either side)."""
    if len(a) < 2 or len(b) < 2:
        return None
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (var_a + var_b) ** 2 / ((var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1)) or math.inf)
    return Estimate.around(statistics.fmean(a) - statistics.fmean(b), t95(int(df)) * math.sqrt(var_a + var_b))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """The mean of per-row differences a - b with a normal 95% interval (unbounded for one row)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = Z95 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
    return Estimate.around(float(diff.mean()), half)


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], q: float = 95, resamples: int = 2000,
                    seed: int = 0) -> Estimate | None:
    """percentile_q(a) / percentile_q(b) with a bootstrap 95% interval (None below five samples)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) < 5 or len(b) < 5:
        return None
    rng = np.random.default_rng(seed)
    ratios = [np.percentile(rng.choice(a, len(a)), q) / np.percentile(rng.choice(b, len(b)), q)
              for _ in range(resamples)]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Estimate(float(np.percentile(a, q) / np.percentile(b, q)), float(low), float(high))


def median_difference(a: Sequence[float], b: Sequence[float], resamples: int = 2000,
                      seed: int = 0) -> Estimate | None:
    """The median of per-pair differences a[i] - b[i], with a bootstrap 95% interval (None below five pairs).
    A stall of another process on a busy machine moves one pair, not the figure, as it moves a mean."""
    diff = np.asarray(a, dtype=np.float64)[:len(b)] - np.asarray(b, dtype=np.float64)[:len(a)]
    if len(diff) < 5:
        return None
    rng = np.random.default_rng(seed)
    low, high = np.percentile([np.median(rng.choice(diff, len(diff))) for _ in range(resamples)], [2.5, 97.5])
    return Estimate(float(np.median(diff)), float(low), float(high))


def ratio_estimate(a: float, a_rel_se: float | None, b: float, b_rel_se: float | None) -> Estimate:
    """a / b with a 95% interval from the two relative standard errors (none when either is unknown)."""
    if a_rel_se is None or b_rel_se is None:
        return Estimate(a / b)
    return Estimate.around(a / b, Z95 * (a / b) * math.hypot(a_rel_se, b_rel_se))


# ------------------------------------------------------------------------------ load levels
def _sigma_ms(level: dict) -> float | None:
    p50, p95 = level.get("p50_ms"), level.get("p95_ms")
    if p50 is None or p95 is None or math.isnan(p50) or math.isnan(p95):
        return None
    return max(p95 - p50, 0.0) / P95_SIGMAS


def median_se_ms(level: dict) -> float | None:
    """Standard error of a level's p50 latency (normal approximation: 1.2533 sigma / sqrt(n))."""
    sigma = _sigma_ms(level)
    n = max(level.get("ok", 0) - level.get("ramp_requests", 0), 0) or level.get("ok", 0)
    return None if sigma is None or n < 2 else 1.2533 * sigma / math.sqrt(n)


def p50_rel_se(level: dict) -> float | None:
    se = median_se_ms(level)
    return None if se is None else se / level["p50_ms"]


def throughput_rel_se(level: dict) -> float | None:
    """Relative standard error of a closed-loop level's captions/s (= that of its mean latency)."""
    sigma, n, mean = _sigma_ms(level), level.get("ok", 0), level.get("mean_ms") or level.get("p50_ms")
    return None if sigma is None or n < 2 or not mean else sigma / mean / math.sqrt(n)


def p50_seconds(level: dict) -> Estimate:
    se = median_se_ms(level)
    return Estimate.around(level["p50_ms"] / 1000, None if se is None else Z95 * se / 1000)


def throughput_ratio(new: dict | None, old: dict | None) -> Estimate | None:
    """captions/s of level `new` over level `old`."""
    if not new or not old or old["captions_per_s"] <= 0:
        return None
    return ratio_estimate(new["captions_per_s"], throughput_rel_se(new), old["captions_per_s"], throughput_rel_se(old))


def p50_ratio(new: dict | None, old: dict | None) -> Estimate | None:
    """p50 latency of level `new` over level `old`."""
    if not new or not old or old["p50_ms"] <= 0:
        return None
    return ratio_estimate(new["p50_ms"], p50_rel_se(new), old["p50_ms"], p50_rel_se(old))
