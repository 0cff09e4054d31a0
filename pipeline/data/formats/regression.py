"""``regression``: one text or a text pair and a numeric score (roles ``text``, ``text_pair``, ``label``).

Canonical record: ``{"text_a", "text_b", "label": float}``; optional ``opts["score_range"]`` = [lo, hi].
"""

from __future__ import annotations

import math

from pipeline.data.formats._text import col, text
from pipeline.data.formats.classification import Classification
from pipeline.data.records import column
from pipeline.data.readers import DataError


class Regression(Classification):
    name = "regression"
    help = "text [+ pair] + numeric score"
    kind = "regression"

    def default_metrics(self, opts):
        return ("pearson", "spearman")

    def normalise(self, record, opts, where):
        a = text(record, opts, "text", where)
        b = text(record, opts, "text_pair", where) if "text_pair" in (opts.get("columns") or {}) else None
        v = column(record, col(opts, "label"), where, "label", opts.get("name", "?"))
        try:
            score = float(v)
        except (TypeError, ValueError):
            raise DataError(f"{where}: column {col(opts, 'label')!r} (score) is {v!r}, not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: column {col(opts, 'label')!r} (score) is {v!r}, not a finite number")
        return {"text_a": a, "text_b": b, "label": score}

    def cast(self, label):
        return float(label)


FORMAT = Regression()
