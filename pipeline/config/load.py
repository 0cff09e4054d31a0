"""Reading ``params.yaml`` (or a preset) and validating it: one :class:`ConfigError` listing every problem
by its dotted path. Duplicate keys, bad YAML and a missing file are problems too; ``train.plugins`` are
imported first (they register methods, which add sections to the schema)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.schema import TrackingConfig, params_model
from pipeline.config.sections import problems_of


class ConfigError(Exception):
    """``params.yaml`` is invalid; ``problems`` holds (dotted path, message) pairs."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = [f"{path}: {len(problems)} problem(s):"] + [f"  - {loc}: {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


def import_plugins(raw: Any) -> list[tuple[str, str]]:
    """Import the modules named in ``train.plugins`` (they register methods); problems by dotted path."""
    plugins = raw.get("train", {}).get("plugins", []) if isinstance(raw.get("train"), dict) else []
    if not isinstance(plugins, list):
        return []  # the schema reports the type
    problems = []
    for i, mod in enumerate(plugins):
        try:
            importlib.import_module(str(mod))
        except Exception as e:  # noqa: BLE001  (any failure of a user module is a params problem)
            problems.append((f"train.plugins.{i}", f"cannot import {mod!r}: {type(e).__name__}: {e}"))
    return problems


def validate_dict(raw: Any, path: str = "params.yaml") -> Any:
    """Validate a parsed params mapping; raise ConfigError with every problem at once."""
    if not isinstance(raw, dict):
        raise ConfigError(path, [("<root>", "expected a mapping of sections (data, base, train, eval, merge, tracking)")])
    plugin_problems = import_plugins(raw)
    try:
        params = params_model().model_validate(raw)
    except ValidationError as e:
        raise ConfigError(path, plugin_problems + [p for err in e.errors() for p in problems_of(err)]) from None
    if plugin_problems:
        raise ConfigError(path, plugin_problems)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that records every duplicate mapping key, at any depth, instead of keeping the last silently.

    Mappings and sequences are constructed top-down, so each one records its children's dotted
    paths (``paths``, by node id) before they are built.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.paths: dict[int, str] = {}
        self.duplicates: list[tuple[int, str, str]] = []  # (line, dotted path, message)

    def _child(self, parent: yaml.Node, child: yaml.Node, key: object) -> str:
        prefix = self.paths.get(id(parent))
        self.paths[id(child)] = path = f"{prefix}.{key}" if prefix else str(key)
        return path

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[object, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden on purpose
                continue
            key = self.construct_object(key_node)
            path = self._child(node, value_node, key)
            line = key_node.start_mark.line + 1
            try:
                if key not in first_line:
                    first_line[key] = line
                    continue
            except TypeError:  # unhashable key: the base constructor reports it
                continue
            self.duplicates.append(
                (
                    line,
                    path,
                    f"duplicate key: first on line {first_line[key]}, again on line {line} (YAML would keep only the last; remove one)",
                )
            )
        return super().construct_mapping(node, deep)

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list:
        for i, item in enumerate(node.value):
            self._child(node, item, i)
        return super().construct_sequence(node, deep)


def load_params(path: str | Path = "params.yaml") -> Any:
    """Read and validate ``params.yaml``."""
    return validate_dict(read_yaml(path), str(path))


def load_tracking(path: str | Path = "params.yaml") -> TrackingConfig:
    """Read only the ``tracking`` section of ``params.yaml`` (where a stage logs; finetune reads nothing else of it)."""
    raw = read_yaml(path)
    section = raw.get("tracking", {}) if isinstance(raw, dict) else {}
    try:
        return TrackingConfig.model_validate(section if section is not None else {})
    except ValidationError as e:
        raise ConfigError(str(path), [(f"tracking.{loc}", msg) for err in e.errors() for loc, msg in problems_of(err)]) from None


def read_yaml(path: str | Path) -> Any:
    """Parse a params (or preset) file; a missing file, bad YAML or a duplicate key is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [("<file>", "not found; run from the repository root or pass --params")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [("<file>", f"not valid UTF-8 ({e.reason} at byte {e.start})")]) from None
    try:
        loader = _UniqueKeyLoader(text)  # the reader rejects characters YAML does not allow (control characters) here
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [_yaml_problem(text, e)]) from None
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [_yaml_problem(text, e)]) from None
    finally:
        loader.dispose()
    if loader.duplicates:  # before any other check: the values of a duplicated key are ambiguous
        raise ConfigError(str(path), [(loc, msg) for _, loc, msg in sorted(loader.duplicates)])
    return raw


def _yaml_problem(text: str, e: yaml.YAMLError) -> tuple[str, str]:
    """(where, message) of a YAML error: a character YAML does not allow, or a syntax error at its mark."""
    if isinstance(e, yaml.reader.ReaderError):
        pos = e.position
        where = f"line {text.count(chr(10), 0, pos) + 1}, column {pos - text.rfind(chr(10), 0, pos)}"
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        return where, f"not valid YAML: character {char} is not allowed ({e.reason}); remove it"
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
    return where, f"YAML syntax error: {getattr(e, 'problem', e)}"
