"""Paired comparisons against LoRA: mean difference over seeds with a Student-t 95 % interval."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats


@dataclass(frozen=True)
class Paired:
    """mean(a − b) over paired seeds, its sample std, and the two-sided t interval at ``level``."""

    n: int
    mean: float
    std: float  # sample std of the differences (ddof=1); nan for n = 1
    low: float  # nan for n = 1 (no interval from one pair)
    high: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "std": self.std, "low": self.low, "high": self.high, "level": self.level}


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    """a_i − b_i for seeds i (same seed = same data order and shared initialisation), with
    mean ± t_{(1+level)/2, n−1} · s/√n."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired: need equally many values, at least one (got {len(a)} and {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = math.fsum(d) / n
    if n == 1:
        return Paired(1, mean, math.nan, math.nan, math.nan, level)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Paired(n, mean, std, mean - half, mean + half, level)


def power(delta: float, sd: float, n: int, level: float = 0.95) -> float:
    """Chance that the paired two-sided t-test at ``level`` (the interval of :func:`paired`) excludes 0 when the true
    mean difference is ``delta`` and the differences' std is ``sd``, over ``n`` pairs: P(|T| > t_{(1+level)/2, n−1})
    for T noncentral t with n − 1 degrees of freedom and noncentrality delta·√n/sd. nan where it is undefined."""
    if n < 2 or not sd > 0 or math.isnan(delta):
        return math.nan
    df, nc = n - 1, delta * math.sqrt(n) / sd
    crit = float(stats.t.ppf((1 + level) / 2, df))
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
