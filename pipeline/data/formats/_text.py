"""Shared checks of record fields."""

from __future__ import annotations

import re
from typing import Any

from pipeline.data.records import column
from pipeline.data.readers import DataError


def col(opts: dict[str, Any], role: str) -> str:
    return (opts.get("columns") or {}).get(role, role)


def text(record: dict, opts: dict[str, Any], role: str, where: str, required: bool = True, allow_empty: bool = False) -> str | None:
    """The string in ``role``'s column; DataError (file:line, column) when missing, not a string or empty."""
    name = opts.get("name", "?")
    v = column(record, col(opts, role), where, role, name, required=required)
    if v is None and not required:
        return None
    if not isinstance(v, str):
        raise DataError(f"{where}: column {col(opts, role)!r} ({role}) must be a string, found {type(v).__name__} {v!r:.60}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: column {col(opts, role)!r} ({role}) is empty (fill it in or remove the record)")
    return v


def fill(template: str, values: dict[str, str]) -> str:
    """``{field}`` placeholders replaced literally (braces inside the values are safe)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)
