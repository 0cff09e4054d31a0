"""``python -m pipeline.params_doc --write | --check``: ``docs/params.md``, generated from the params schema.

The page lists every key of ``params.yaml`` with its type, default, bounds and help text, read from
the pydantic schema (:func:`pipeline.config.schema.params_model`) by walking its fields recursively: nested
sections, the ``SourceConfig`` of a declared dataset's splits, and the sections the library's settings
dataclasses become (``pipeline/config/sections.py``). ``--check`` exits 1 when the committed page differs
from what ``--write`` would write (``tests/test_params_doc.py`` does the same).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pipeline.terminal.quiet import quiet

quiet()  # first: a train.plugins module, imported to validate, may import torch/peft/bitsandbytes

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from pipeline.config.schema import params_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "params.md"
COMMAND = "python -m pipeline.params_doc --write"
_SYMBOLS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}

HEADER = f"""# Parameters (`params.yaml`)

<!-- Generated from the schema by `{COMMAND}`; do not edit by hand (tests/test_params_doc.py fails when it is stale). -->

Every key of `params.yaml`: its type, default, bounds and help text. Each setting is declared once. The
library's settings are fields of frozen dataclasses that the code using them imports, declared in modules
that import no torch (`bilora/config.py`: `LoopConfig`, `LoraSpec`, `DistributedConfig` and each built-in
method's settings; `bilora/sharpness/config.py` `SharpnessConfig`), whose
`setting(default, help, ge=..., ...)` (`bilora/settings.py`) carries the help text and bounds;
`pipeline/config/sections.py` turns them into pydantic sections, which check them. The pipeline's own
sections (`data`, `base`, `eval`, `merge`, `tracking` and the matrix keys of `train`) are pydantic models in
`pipeline/config/schema.py`, and `params_model()` there assembles the whole schema. Each section below names
the class it comes from.

`python -m pipeline.validate` (and every stage, and `python -m pipeline.run` before `dvc repro`) checks
`params.yaml` against this schema and reports every problem at once by dotted path, exit code 2. Beyond
each key's type and bounds it rejects unknown keys, duplicate keys (both line numbers given), characters
YAML does not allow, non-finite numbers (`.inf`, `.nan`, list entries included) and combinations a stage
would reject before training: `train.loop.batch_size` not divisible by `train.distributed.nproc_per_node`,
a `data.val_fraction` that leaves no training rows of `data.train_subset`, a merge target outside the
matrix, a variant overriding a key its method lacks. A method added through `train.plugins` brings its
own `train.<key>` section, declared the same way (see [extending.md](extending.md)).
"""


def _md(text: str) -> str:
    """Table-cell text: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _section_of(ann: Any) -> type[BaseModel] | None:
    """The section model inside an annotation (``X``, ``X | None``), or None."""
    for t in (ann, *(get_args(ann) if get_origin(ann) in (Union, types.UnionType) else ())):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _type(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"dict[{_type(args[0])}, {_type(args[1])}]"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v else '""'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _default(f: FieldInfo) -> str:
    if f.default_factory is not None:
        v = f.default_factory()  # type: ignore[call-arg]
        return "(section)" if isinstance(v, BaseModel) else f"`{_md(_value(v))}`"
    if f.default is PydanticUndefined:
        return "required"
    return f"`{_md(_value(f.default))}`"


def _bounds_of(metadata: list) -> list[str]:
    out = []
    for m in metadata:
        for name, sym in _SYMBOLS.items():
            if getattr(m, name, None) is not None:
                out.append(f"{sym} {getattr(m, name)}")
        if getattr(m, "min_length", None) is not None:
            out.append(f"length ≥ {m.min_length}")
        if getattr(m, "max_length", None) is not None:
            out.append(f"length ≤ {m.max_length}")
    return out


def _bounds(f: FieldInfo) -> str:
    out = _bounds_of(f.metadata)
    for item in get_args(f.annotation):  # list[Annotated[float, Field(ge=0)]]: bounds on every entry
        if get_origin(item) is typing.Annotated:
            out += [f"each {b}" for m in get_args(item)[1:] for b in _bounds_of(getattr(m, "metadata", [m]))]
    return ", ".join(out) or "–"


def _origin(model: type[BaseModel]) -> str:
    """Where a section is declared: the library dataclass it derives from, or the pydantic class."""
    cls = getattr(model, "settings_class", model)
    path = cls.__module__.replace(".", "/") + ".py"
    if (ROOT / cls.__module__.replace(".", "/") / "__init__.py").is_file():
        path = cls.__module__.replace(".", "/") + "/__init__.py"
    return f"`{path}` `{cls.__name__}`"


def _sections(model: type[BaseModel], path: str, intro: str) -> list[tuple[str, type[BaseModel], str]]:
    """(dotted path, model, intro) of this section and every section below it, depth first."""
    out = [(path, model, intro)]
    for name, f in model.model_fields.items():
        sub = _section_of(f.annotation)
        if sub is None and get_origin(f.annotation) is dict:
            sub = _section_of(get_args(f.annotation)[1])
            if sub is not None:  # a mapping of named sections: data.datasets.<name>
                out += _sections(sub, f"{path}.{name}.<name>", f.description or "")
            continue
        if sub is not None:
            out += _sections(sub, f"{path}.{name}" if path else name, f.description or (sub.__doc__ or "").strip())
    return out


def _table(model: type[BaseModel], path: str) -> list[str]:
    rows = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, f in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        sub, dict_sub = _section_of(f.annotation), get_origin(f.annotation) is dict and _section_of(get_args(f.annotation)[1])
        if dict_sub:
            typ, default = f"mapping of name → section `{key}.<name>`", _default(f)
        elif sub is not None:
            typ = "section" if sub is f.annotation else f"section `{key}` \\| null"
            default = _default(f) if sub is not f.annotation else "(section)"
        else:
            typ, default = f"`{_md(_type(f.annotation))}`", _default(f)
        rows.append(f"| `{key}` | {typ} | {default} | {_bounds(f)} | {_md(f.description or '')} |")
    return rows


def render() -> str:
    """The whole page, from the schema with the methods registered now."""
    lines = [HEADER]
    top = params_model()
    for name, f in top.model_fields.items():
        for path, model, intro in _sections(_section_of(f.annotation), name, f.description or ""):  # type: ignore[arg-type]
            level = "##" if "." not in path else "###"
            lines += [f"{level} `{path}`", ""]
            intro = " ".join(intro.split())
            lines += [f"{intro} Declared in {_origin(model)}." if intro else f"Declared in {_origin(model)}.", ""]
            lines += _table(model, path) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the page")
    mode.add_argument("--check", action="store_true", help="exit 1 if the page is not what --write would write")
    ap.add_argument("--path", type=Path, default=PAGE, help=f"the page (default: {PAGE.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    text = render()
    if args.write:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(text, encoding="utf-8")
        print(f"wrote {args.path}")
        return
    if not args.path.is_file() or args.path.read_text(encoding="utf-8") != text:
        print(f"{args.path} is stale (the params schema changed); run: {COMMAND}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.path} is up to date")


if __name__ == "__main__":
    main()
