"""The precision at which committed figures (``metrics/``, ``reports/``) are recorded.

Training runs in float32. Its matmuls and reductions sum in an order set by the CPU's vector width
(AVX2: 8 lanes, AVX-512: 16), so the same run on two CPU classes agrees to ~1e-7 relative per step,
not bit for bit; further digits would record the machine, not the method. Committed figures are
therefore rounded to :data:`SIGNIFICANT` significant digits. Sharpness is measured in float64
(``eval.sharpness.dtype``) so that its small loss differences are resolved to that precision too.
A spread is written to the decimal place of its mean ("x ± s" with the same decimals, the usual
convention): the spread over a few random directions at the smallest radius is a difference of
nearly equal losses and inherits the mean's absolute uncertainty, not a relative one of its own.
MLflow runs and the stage outputs under ``artifacts/`` keep the full values.
"""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT = 4


def _decimals(value: float, digits: int) -> int:
    """Decimal places that keep ``digits`` significant digits of ``value`` (may be negative)."""
    return digits - 1 - math.floor(math.log10(abs(value)))


def _mean_key(key: str) -> str | None:
    """The key of the mean a spread belongs to: ``std`` -> ``mean``, ``a.b.std`` -> ``a.b.mean``."""
    if key == "std":
        return "mean"
    return key[: -len("std")] + "mean" if key.endswith(".std") else None


def rounded(value: Any, digits: int = SIGNIFICANT) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (dicts and lists recursively;
    ints, bools, strings unchanged). In a dict, a float ``std`` (or ``<x>.std``) next to a non-zero
    float ``mean`` (``<x>.mean``) is rounded to the decimal place of that mean instead."""
    if isinstance(value, float):
        if value == 0.0 or not math.isfinite(value):
            return value
        return round(value, _decimals(value, digits))
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            mean = value.get(_mean_key(k)) if isinstance(k, str) and _mean_key(k) else None
            if isinstance(v, float) and math.isfinite(v) and isinstance(mean, float) and math.isfinite(mean) and mean != 0.0:
                out[k] = round(v, _decimals(mean, digits))
            else:
                out[k] = rounded(v, digits)
        return out
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value
