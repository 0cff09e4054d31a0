"""Presets: ``pipeline/presets/<name>.yaml`` is a delta over params.yaml (only the keys it changes, as
nanoGPT's ``config/finetune_*.py``). :func:`load_preset` validates the merged result (every problem at
once, naming the preset file); :func:`apply_preset` then writes the changed keys into params.yaml,
keeping its comments and the other keys (``python -m pipeline.run --preset NAME``)."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from bilora.io import atomic_write_text
from pipeline.config.load import ConfigError, read_yaml, validate_dict
from pipeline.terminal.console import console
from pipeline.terminal.user_error import UserError


PRESETS = Path(__file__).resolve().parents[1] / "presets"


def deep_merge(base: Any, delta: Any) -> Any:
    """``delta`` deep-merged over ``base``: mappings merge key by key; anything else (a list, a
    scalar, an empty mapping) replaces the value. Neither argument is modified."""
    if not isinstance(delta, dict) or not isinstance(base, dict) or not delta:
        return copy.deepcopy(delta)
    out = copy.deepcopy(base)
    for k, v in delta.items():
        out[k] = deep_merge(out[k], v) if k in out else copy.deepcopy(v)
    return out


def preset_path(name: str) -> Path:
    src = PRESETS / f"{name}.yaml"
    if not src.is_file():
        known = sorted(f.stem for f in PRESETS.glob("*.yaml"))
        raise UserError(f"--preset {name!r}: no {src}; available presets: {known}")
    return src


def load_preset(name: str, params_path: str = "params.yaml") -> tuple[dict, dict, Any]:
    """(delta, merged params mapping, validated params) of ``pipeline/presets/<name>.yaml`` over
    ``params_path``. Problems of the merged result raise one ConfigError naming the preset file."""
    src = preset_path(name)
    delta = read_yaml(src) or {}
    if not isinstance(delta, dict):
        raise ConfigError(str(src), [("<root>", "a preset is a mapping of the params.yaml keys it changes")])
    merged = deep_merge(read_yaml(params_path), delta)
    return delta, merged, validate_dict(merged, f"{src} (merged over {params_path})")


def apply_preset(name: str, params_path: str) -> None:
    """Merge ``pipeline/presets/<name>.yaml`` over ``params_path`` and write it back (nothing is
    written if the result is invalid). Only the preset's keys change; comments elsewhere stay."""
    from ruamel.yaml import YAML

    load_preset(name, params_path)  # validate the merged result first
    rt = YAML()  # round-trip: keeps params.yaml's comments and key order, and the preset's own style
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(Path(params_path).read_text(encoding="utf-8"))
    delta = rt.load(preset_path(name).read_text(encoding="utf-8"))

    def put(node: Any, d: Any) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v and isinstance(node.get(k), dict):
                put(node[k], v)
                continue
            node[k] = v  # the preset's value, with the preset's end-of-line comment (or none)
            node.ca.items.pop(k, None)
            if k in d.ca.items:
                node.ca.items[k] = d.ca.items[k]
                for tok in node.ca.items[k]:  # drop the blank lines that ended the preset's section
                    if getattr(tok, "value", None):
                        tok.value = tok.value.rstrip("\n") + "\n"

    put(doc, delta)
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(params_path, buf.getvalue())
    keys = sorted(flatten_keys(delta))
    console.print(
        f"[yellow]preset {name}[/]: merged {len(keys)} key(s) of {preset_path(name).relative_to(PRESETS.parent.parent)} over {params_path}: {', '.join(keys)}"
    )


def flatten_keys(d: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of a preset (a list or empty mapping is one leaf)."""
    out = []
    for k, v in d.items():
        out += flatten_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out
