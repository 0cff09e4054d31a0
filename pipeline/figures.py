"""The precision at which committed figures (``metrics/``, ``reports/``) are recorded.

Training runs in float32. Its matmuls and reductions sum in an order set by the CPU's vector width
(AVX2: 8 lanes, AVX-512: 16), so the same run on two CPU classes agrees to ~1e-7 relative per step,
not bit for bit; further digits would record the machine, not the method. Committed figures are
therefore rounded to :data:`SIGNIFICANT` significant digits. Sharpness is measured in float64
(``eval.sharpness.dtype``) so that its small loss differences are resolved to that precision too.
MLflow runs and the stage outputs under ``artifacts/`` keep the full values.
"""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT = 4


def rounded(value: Any, digits: int = SIGNIFICANT) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (dicts and lists recursively; ints, bools, strings unchanged)."""
    if isinstance(value, float):
        if value == 0.0 or not math.isfinite(value):
            return value
        return round(value, digits - 1 - math.floor(math.log10(abs(value))))
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value
