"""Typed settings: stdlib dataclasses whose fields carry their help text and bounds.

Every setting of the library is declared once, as a field of a frozen dataclass that the code using
it imports: those ``params.yaml`` sets live in :mod:`bilora.config` (the loop, the primary adapter, data
parallelism, each built-in method; torch-free, so the params schema loads without the training stack)
and :class:`bilora.sharpness.config.SharpnessConfig`. :func:`setting` records the help text and the
bounds in the field's metadata, and :class:`Settings` checks them (plus a class's own
:meth:`Settings.problems`) in ``__post_init__``, raising :class:`SettingsError` with *every* problem at
once, by field name. The pipeline derives its ``params.yaml`` schema from the same fields
(``pipeline/config/sections.py``), so defaults, bounds and help text exist once. A field the code sets rather than the user is :func:`internal` (no params key).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, get_args, get_origin

BOUNDS = ("ge", "gt", "le", "lt")
_OPS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def setting(default: Any, help: str, *, min_len: int | None = None, items: dict[str, float] | None = None, **bounds: float) -> Any:
    """A dataclass field with help text; ``ge``/``gt``/``le``/``lt`` bound a number (None passes),
    ``items`` bounds every entry of a sequence, ``min_len`` its length."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"setting(): unknown bound(s) {sorted(unknown)}")
    meta = {"help": help, "bounds": bounds, "items": items or {}, "min_len": min_len}
    if isinstance(default, (list, dict, set)):
        raise TypeError("setting(): use a tuple for a sequence default (settings are frozen)")
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any, help: str) -> Any:
    """A dataclass field the code sets, not the user: no ``params.yaml`` key, left out of run files and
    MLflow params (e.g. the task head a format trains next to the primary adapter)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("internal(): use a tuple for a sequence default (settings are frozen)")
    return dataclasses.field(default=default, metadata={"help": help, "internal": True})


def setting_fields(cls: Any) -> tuple[dataclasses.Field, ...]:
    """The fields of a settings class (or object) a user sets: every field but the :func:`internal` ones."""
    return tuple(f for f in dataclasses.fields(cls) if not f.metadata.get("internal"))


def values(settings: Any) -> dict[str, Any]:
    """A settings object's user-set values by field name (tuples as lists, as JSON and YAML hold them)."""
    return {f.name: _plain(getattr(settings, f.name)) for f in setting_fields(settings)}


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


class SettingsError(ValueError):
    """Invalid settings; ``problems`` holds (field name, message) pairs, all of them."""

    def __init__(self, owner: str, problems: list[tuple[str, str]]) -> None:
        self.owner, self.problems = owner, problems
        super().__init__("; ".join(f"{owner}.{f}: {m}" for f, m in problems))


def _bound_problems(value: Any, bounds: dict[str, float]) -> list[str]:
    out = []
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return out
    if isinstance(value, float) and not math.isfinite(value):
        return [f"must be finite, got {value}"]
    for name, b in bounds.items():
        ok, sym = _OPS[name]
        if not ok(value, b):
            out.append(f"must be {sym} {b}, got {value}")
    return out


class Settings:
    """Mixin for frozen settings dataclasses: field checks in ``__post_init__``.

    Fields annotated ``float`` accept ints (stored as float); ``Literal`` fields accept their
    choices only; bounds come from :func:`setting`. Subclasses add cross-field checks by
    overriding :meth:`problems`.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        problems: list[tuple[str, str]] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, hint = getattr(self, f.name), hints[f.name]
            if hint is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, value := float(value))
            if get_origin(hint) is tuple and isinstance(value, list):
                object.__setattr__(self, f.name, value := tuple(value))
            if get_origin(hint) is Literal and value not in get_args(hint):
                problems.append((f.name, f"must be one of {list(get_args(hint))}, got {value!r}"))
            meta = f.metadata
            problems += [(f.name, m) for m in _bound_problems(value, meta.get("bounds", {}))]
            if isinstance(value, tuple):
                if meta.get("min_len") and len(value) < meta["min_len"]:
                    problems.append((f.name, f"needs at least {meta['min_len']} entr{'y' if meta['min_len'] == 1 else 'ies'}"))
                for i, item in enumerate(value):
                    problems += [(f"{f.name}.{i}", m) for m in _bound_problems(item, meta.get("items", {}) or {})]
                    if get_args(hint) and get_origin(get_args(hint)[0]) is Literal and item not in get_args(get_args(hint)[0]):
                        problems.append((f"{f.name}.{i}", f"must be one of {list(get_args(get_args(hint)[0]))}, got {item!r}"))
        if not problems:
            problems = self.problems()
        if problems:
            raise SettingsError(getattr(self, "section", type(self).__name__), problems)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks of a subclass: (field name, message) pairs (default: none). Read only the
        fields: the params schema runs this on its validated section, which has the same field names."""
        return []


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of settings class ``cls``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]
