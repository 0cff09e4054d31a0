"""The base of every ``params.yaml`` section, and the sections derived from the library's settings
dataclasses (:mod:`bilora.settings`).

A dataclass field becomes a pydantic field with the same default, its help text as the
description, and its bounds (``ge``/``gt``/``le``/``lt``, ``min_len``, per-item bounds); tuples
become lists (what YAML holds); :func:`bilora.settings.internal` fields (set by the code) are left
out. pydantic checks each field against those bounds: that is the one validation of a setting on the
params path. A class's own cross-field ``problems()`` then run on the validated section (it has the
same field names), their problems reported by field name like pydantic's.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from bilora.settings import Settings, setting_fields


class Section(BaseModel):
    """A section of ``params.yaml``: unknown keys rejected, frozen, every float (list entries included) finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SectionProblems(ValueError):
    """(path relative to the section, message) pairs raised by a section validator."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in problems))
        self.problems = problems


def _annotation(hint: Any, meta: dict) -> Any:
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        if meta.get("items"):
            item = Annotated[item, Field(**meta["items"])]
        return list[item]
    return hint


def section_model(cls: type[Settings], extra: dict[str, Any] | None = None, doc: str | None = None) -> type[Section]:
    """The ``params.yaml`` section of settings class ``cls``: ``extra`` (pipeline-only) fields first, then
    one field per setting of ``cls``. Built on first use and cached per class (without ``extra``)."""
    if extra is None and cls in _cache:
        return _cache[cls]
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = dict(extra or {})
    for f in setting_fields(cls):
        meta = f.metadata
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        kw = dict(meta.get("bounds", {}))
        if meta.get("min_len"):
            kw["min_length"] = meta["min_len"]
        fields[f.name] = (_annotation(hints[f.name], meta), Field(default, description=meta.get("help"), **kw))

    def _cross_field_checks(self: Section) -> Section:
        problems = cls.problems(self)  # type: ignore[arg-type]  (the section has the class's field names)
        if problems:
            raise SectionProblems(problems)
        return self

    model = create_model(
        cls.__name__,
        __base__=Section,
        __doc__=doc or cls.__doc__,
        __validators__={"_cross_field_checks": model_validator(mode="after")(_cross_field_checks)},
        **fields,
    )
    model.settings_class = cls  # type: ignore[attr-defined]
    if extra is None:
        _cache[cls] = model
    return model


_cache: dict[type, type[Section]] = {}


def to_settings(section: BaseModel) -> Settings:
    """The library dataclass of a derived section (its extra, pipeline-only fields dropped)."""
    cls = type(section).settings_class  # type: ignore[attr-defined]
    return cls(**{f.name: getattr(section, f.name) for f in setting_fields(cls)})


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def problems_of(err: dict) -> list[tuple[str, str]]:
    """One pydantic error (an item of ``ValidationError.errors()``) as (dotted path, message) pairs."""
    loc, msg = _loc(err["loc"]), err["msg"]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, SectionProblems):  # a model validator's cross-field problems, by their own paths
        prefix = "" if loc == "<root>" else loc + "."
        return [(prefix + sub, m) for sub, m in cause.problems]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?); every key is listed in docs/params.md"
    elif err["type"] in ("literal_error", "finite_number"):
        msg = f"{msg} (got {err.get('input')!r})"
    return [(loc, msg)]
