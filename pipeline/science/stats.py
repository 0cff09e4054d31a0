"""Paired comparisons against LoRA: mean difference over seeds with a Student-t 95 % interval; for the second protocol
also Holm's step-down adjustment, the paired t and equivalence (TOST) p-values, and a paired bootstrap over replicates ×
test examples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np
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


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order: with p_(1) ≤ … ≤ p_(m) the sorted values,
    adj_(k) = max_{j ≤ k} min(1, (m − j + 1) · p_(j)). Rejecting where adj ≤ α controls the family-wise error at α."""
    p = [float(x) for x in pvalues]
    if any(not 0.0 <= x <= 1.0 for x in p):  # also rejects nan
        raise ValueError(f"holm: p-values must lie in [0, 1] (got {p})")
    m, adj, running = len(p), [0.0] * len(p), 0.0
    for j, i in enumerate(sorted(range(m), key=p.__getitem__)):  # j = 0 … m − 1 is the rank k − 1
        running = max(running, min(1.0, (m - j) * p[i]))
        adj[i] = running
    return adj


def _t_of_mean(d: Sequence[float]) -> tuple[float, float, int]:
    """mean(d), its standard error s/√n (s with ddof = 1) and the degrees of freedom n − 1; nan where n < 2."""
    n = len(d)
    mean = math.fsum(d) / n if n else math.nan
    if n < 2:
        return mean, math.nan, max(n - 1, 0)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, std / math.sqrt(n), n - 1


def paired_t_p(d: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t test of mean(d) = 0: 2 · P(T_{n−1} > |mean| / (s/√n)). It is below
    1 − level exactly when the interval of :func:`paired` at ``level`` excludes 0. nan for n < 2 or s = 0."""
    mean, se, df = _t_of_mean(d)
    if not se > 0:
        return math.nan
    return float(2 * stats.t.sf(abs(mean) / se, df))


def tost(d: Sequence[float], bound: float) -> float:
    """Two one-sided tests for equivalence of mean(d) to 0 within ±bound: max(p_lower, p_upper) with
    p_lower = P(T_{n−1} > (mean + bound)/(s/√n)) (H0: mean ≤ −bound) and p_upper = P(T_{n−1} < (mean − bound)/(s/√n))
    (H0: mean ≥ bound). Below α exactly when the (1 − 2α) t interval of :func:`paired` lies inside (−bound, bound).
    nan for n < 2 or s = 0."""
    mean, se, df = _t_of_mean(d)
    if not se > 0:
        return math.nan
    p_lower = float(stats.t.sf((mean + bound) / se, df))
    p_upper = float(stats.t.cdf((mean - bound) / se, df))
    return max(p_lower, p_upper)


def accuracy(labels, preds) -> float:
    """Fraction of examples with preds_j == labels_j."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def pearson(labels, preds) -> float:
    """Pearson correlation Σ (x − x̄)(y − ȳ) / √(Σ (x − x̄)² · Σ (y − ȳ)²) of preds x with labels y; nan if either is
    constant."""
    return float(_pearson_rows(np.asarray(labels), np.asarray(preds)[None, :])[0])


def _accuracy_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """:func:`accuracy` of every row of p (k × m) against y (m)."""
    return (p == y).mean(axis=1)


def _pearson_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """:func:`pearson` of every row of p (k × m) against y (m)."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    yc = y - y.mean()
    pc = p - p.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pc @ yc) / np.sqrt((pc * pc).sum(axis=1) * (yc @ yc))


# the metrics with a form vectorised over replicates; any other callable goes replicate by replicate
_ROWS: dict[Callable, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {accuracy: _accuracy_rows, pearson: _pearson_rows}


def _metric_diffs(metric: Callable, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """metric(y, a_i) − metric(y, b_i) for every replicate i (rows of a and b)."""
    rows = next((r for f, r in _ROWS.items() if f is metric), None)
    if rows is not None:
        return rows(y, a) - rows(y, b)
    return np.array([metric(y, ai) - metric(y, bi) for ai, bi in zip(a, b)], dtype=float)


def _replicate_draws(strata: Sequence[Hashable], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """n_boot × k replicate indices: each stratum (in order of first appearance) resampled with replacement within
    itself, keeping its count; the columns are grouped by stratum."""
    groups: dict[Hashable, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    cols = [np.asarray(g)[rng.integers(0, len(g), size=(n_boot, len(g)))] for g in groups.values()]
    return np.concatenate(cols, axis=1)


def paired_bootstrap(
    labels: Sequence,
    preds_a: Sequence[Sequence],
    preds_b: Sequence[Sequence],
    metric: Callable[[np.ndarray, np.ndarray], float],
    strata: Sequence[Hashable],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    return_draws: bool = False,
) -> dict:
    """Paired bootstrap of T = (1/k) Σ_i [metric(y, a_i) − metric(y, b_i)] over k replicates (replicate i of a and of b
    share data subset and seed) and m test examples y shared by all replicates. Each draw resamples the replicates with
    replacement within each stratum (keeping the count per stratum) and, independently, the m examples with replacement
    (one example resample per draw, shared by every replicate and by a and b); T* is T on the resampled data.

    Returns {"mean": T on the original data, "std": sample std of the T*, "low", "high": the (1 ∓ level)/2 quantiles of
    the T* (percentile interval), "n_boot", "level", "seed"}; with ``return_draws`` also "draws" (the n_boot T*) and
    "replicates" (n_boot × k resampled replicate indices). Random numbers come from ``numpy.random.default_rng(seed)``
    only. ``metric`` receives numpy arrays; :func:`accuracy` and :func:`pearson` take a path vectorised over replicates."""
    y = np.asarray(labels)
    a, b = np.asarray(preds_a), np.asarray(preds_b)
    k, m = len(preds_a), len(y)
    if not k or a.shape != (k, m) or b.shape != (k, m) or len(strata) != k:
        raise ValueError(
            f"paired_bootstrap: need k ≥ 1 replicates of a and b, each of the {m} labels' length, and k strata "
            f"(got a {a.shape}, b {b.shape}, {len(strata)} strata)"
        )
    if m < 1 or n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: need m ≥ 1, n_boot ≥ 1, 0 < level < 1 (got {m}, {n_boot}, {level})")
    rng = np.random.default_rng(seed)
    reps = _replicate_draws(strata, n_boot, rng)
    draws = np.empty(n_boot)
    for t in range(n_boot):
        idx = rng.integers(0, m, size=m)
        draws[t] = _metric_diffs(metric, y[idx], a[:, idx], b[:, idx])[reps[t]].mean()
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    out = {
        "mean": float(_metric_diffs(metric, y, a, b).mean()),
        "std": float(draws.std(ddof=1)) if n_boot > 1 else math.nan,
        "low": float(low),
        "high": float(high),
        "n_boot": n_boot,
        "level": level,
        "seed": seed,
    }
    if return_draws:
        out.update(draws=draws, replicates=reps)
    return out
