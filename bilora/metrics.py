"""Task metrics, numpy only (no sklearn / scipy), computed in float64.

All values are fractions: accuracy, F1 (binary or macro) and exact match in [0, 1]; MCC, Pearson and
Spearman in [-1, 1] (not percentages). Inputs are 1-D sequences of equal, non-zero length.

Conventions where a metric is undefined (no positives, a constant input): the value is 0.0,
as sklearn does for F1 and MCC. Non-finite regression predictions give NaN for Pearson and
Spearman rather than an exception, so a diverged run is reported, not crashed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"expected 1-D predictions and labels, got shapes {p.shape} and {y.shape}")
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {len(p)} vs {len(y)}")
    if len(p) == 0:
        raise ValueError("no predictions to score (empty input)")
    return p, y


def accuracy(preds, labels) -> float:
    """Fraction of positions where the prediction equals the label (works for ints and strings)."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def exact_match(preds, labels) -> float:
    """Fraction of exactly equal (prediction, label) pairs, e.g. extracted GSM8K final answers.

    No normalisation happens here: normalise (strip commas, whitespace ...) before calling.
    """
    p, y = _pair([str(v) for v in preds], [str(v) for v in labels])
    return float(np.mean(p == y))


def f1_binary(preds, labels, positive=1) -> float:
    """F1 of the ``positive`` class: 2TP / (2TP + FP + FN); 0.0 when there are no predicted or true positives."""
    p, y = _pair(preds, labels)
    pp, yp = p == positive, y == positive
    tp = float(np.sum(pp & yp))
    fp = float(np.sum(pp & ~yp))
    fn = float(np.sum(~pp & yp))
    denom = 2.0 * tp + fp + fn
    return 0.0 if denom == 0.0 else 2.0 * tp / denom


def f1_macro(preds, labels) -> float:
    """Unweighted mean of the per-class F1 over every class that occurs in the labels or the predictions
    (sklearn's ``f1_score(average="macro")``); a class with no true and no predicted example never counts."""
    p, y = _pair(preds, labels)
    classes = np.unique(np.concatenate([y, p]))
    return float(np.mean([f1_binary(p, y, positive=c) for c in classes]))


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K) form.

    With confusion matrix C (rows true, columns predicted), t_k = row sums, p_k = column sums,
    c = trace(C), s = total:  MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)).
    For two classes this equals (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    0.0 when the denominator is zero (only one class predicted or present).
    """
    p, y = _pair(preds, labels)
    _, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = int(inv.max()) + 1
    n = len(y)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (inv[:n], inv[n:]), 1.0)
    t = cm.sum(axis=1)
    pk = cm.sum(axis=0)
    c = np.trace(cm)
    s = float(n)
    cov_yp = c * s - float(t @ pk)
    cov_pp = s * s - float(pk @ pk)
    cov_yy = s * s - float(t @ t)
    denom = cov_pp * cov_yy
    if denom <= 0.0:
        return 0.0
    return float(cov_yp / np.sqrt(denom))


def _floats(x, y) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pair(x, y)
    return a.astype(np.float64), b.astype(np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    ac, bc = a - a.mean(), b - b.mean()
    denom = np.sqrt(np.dot(ac, ac) * np.dot(bc, bc))
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.dot(ac, bc) / denom, -1.0, 1.0))


def pearson(x, y) -> float:
    """Pearson correlation; 0.0 if either input is constant, NaN if any value is non-finite."""
    return _pearson(*_floats(x, y))


def _rank_average(a: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span (scipy.stats.rankdata 'average')."""
    order = np.argsort(a, kind="mergesort")
    sa = a[order]
    new_group = np.concatenate([[True], sa[1:] != sa[:-1]])
    group = np.cumsum(new_group) - 1  # group id per sorted position
    starts = np.flatnonzero(new_group)  # 0-based first position of each group
    ends = np.append(starts[1:], len(a))  # exclusive end
    mean_rank = (starts + 1 + ends) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties averaged)."""
    a, b = _floats(x, y)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return _pearson(_rank_average(a), _rank_average(b))


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "f1_macro": f1_macro,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
    "exact_match": exact_match,
}


LOWER_IS_BETTER = frozenset({"loss", "perplexity", "base_loss"})  # held-out LM loss metrics of the generation formats


def improvement(name: str, new: float, old: float) -> float:
    """How much ``new`` improves on ``old`` for metric ``name``: new − old, negated where lower is better."""
    return (old - new) if name in LOWER_IS_BETTER else (new - old)


def compute(names: Sequence[str], preds, labels) -> dict[str, float]:
    """Each named metric of (preds, labels), in the order given; unknown names -> ValueError."""
    if isinstance(names, str):
        names = (names,)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {', '.join(METRICS)}")
    return {n: METRICS[n](preds, labels) for n in names}
