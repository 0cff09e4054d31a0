"""pydantic sections derived from the library's settings dataclasses (:mod:`bilora.settings`).

A dataclass field becomes a pydantic field with the same default, its help text as the
description, and its bounds (``ge``/``gt``/``le``/``lt``, ``min_len``, per-item bounds); tuples
become lists (what YAML holds). After the fields validate, the dataclass itself is built, so its
own ``problems()`` checks run too and come back as pydantic errors by field name.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, Field, create_model, model_validator

from bilora.settings import Settings, SettingsError


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


def section_model(
    cls: type[Settings], model_name: str, base: type[BaseModel], extra: dict[str, Any] | None = None, doc: str | None = None
) -> type[BaseModel]:
    """A pydantic model with ``extra`` fields first, then one field per field of ``cls``."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = dict(extra or {})
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        kw = dict(meta.get("bounds", {}))
        if meta.get("min_len"):
            kw["min_length"] = meta["min_len"]
        fields[f.name] = (_annotation(hints[f.name], meta), Field(default, description=meta.get("help"), **kw))
    names = [f.name for f in dataclasses.fields(cls)]

    def _dataclass_checks(self: BaseModel) -> BaseModel:
        try:
            cls(**{n: getattr(self, n) for n in names})
        except SettingsError as e:
            raise SectionProblems(e.problems) from None
        return self

    model = create_model(
        model_name,
        __base__=base,
        __doc__=doc or cls.__doc__,
        __validators__={"_dataclass_checks": model_validator(mode="after")(_dataclass_checks)},
        **fields,
    )
    model.settings_class = cls  # type: ignore[attr-defined]
    return model


def to_settings(section: BaseModel) -> Settings:
    """The library dataclass of a derived section (its extra, pipeline-only fields dropped)."""
    cls = type(section).settings_class  # type: ignore[attr-defined]
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


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
