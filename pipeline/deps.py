"""``python -m pipeline.deps [--check | --write]``: every stage's code deps in dvc.yaml, generated from its imports.

A stage's code deps are the project files (``bilora/``, ``pipeline/``, ``stages/``) its command runs:
the ``python -m`` modules of its ``cmd``, then every project module they import, followed at any depth
(function-local imports and ``TYPE_CHECKING`` blocks included: ``import a.b``, ``from a import b`` where
``b`` may be a submodule, relative imports), plus the ``__init__.py`` of every package above an imported
module (Python runs it first). Third-party imports are ignored. The imports in :data:`EXCLUDED` are not
followed, each for the reason it gives; nothing else is left out, so a stage re-runs whenever code it
imports changes (over-invalidation, never a stale output).

A folder every file of which is in the closure is listed as the folder (``bilora/methods``: importing it
imports every method); otherwise files are listed one by one, so an edit re-runs only the stages that
import it. ``pipeline/presets`` and ``pipeline/vega`` are read by no stage and so are no stage's dep.

``--write`` rewrites the code-dep lines of each stage's ``deps`` in dvc.yaml in place (the first code dep's
position; the other deps, params, outs and every comment stay as they are). ``--check`` (the default)
exits 1 naming each stage whose code deps differ from what ``--write`` would write.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bilora", "pipeline", "stages")
IGNORED = ("__pycache__",)  # .dvcignore: bytecode is not part of a folder dep's hash
IGNORED_SUFFIXES = (".pyc",)


class Exclusion(NamedTuple):
    """An import the closure does not follow: ``importer`` imports ``imported``, for ``reason``."""

    importer: str
    imported: str
    reason: str


_SETTINGS_ONLY = (
    "the params schema reads only this settings dataclass's fields (defaults, bounds, help text); every value reaches "
    "a stage through params.yaml, which DVC tracks key by key, so the code is a dep of the stages that run it ({runs})"
)
EXCLUDED: tuple[Exclusion, ...] = (
    Exclusion(
        "pipeline.config.schema", "bilora.config", _SETTINGS_ONLY.format(runs="configure imports bilora.config, finetune bilora.train")
    ),
    Exclusion("pipeline.config.schema", "bilora.sharpness.config", _SETTINGS_ONLY.format(runs="evaluate imports bilora.sharpness")),
    Exclusion(
        "pipeline.config.schema",
        "pipeline.data.formats",
        "the params schema reads only each format's name, head kind and help text from the registry (to check "
        "data.datasets.<name>.format and an eval-only dataset's head); the stages whose outputs a format shapes "
        "(prepare, finetune, evaluate, merge, report) import pipeline.data.formats themselves",
    ),
)


# ---------------------------------------------------------------------------------------------- the import graph
def module_file(module: str, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Path | None:
    """The file defining ``module`` in the project (``a/b.py`` or ``a/b/__init__.py``), else None."""
    parts = module.split(".")
    if parts[0] not in packages:
        return None
    base = root.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    """``a/b/c.py`` -> ``a.b.c``; ``a/b/__init__.py`` -> ``a.b``."""
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a submodule runs every package above it."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class Import(NamedTuple):
    """One imported project module, with the names taken from it (``from m import x, y``; empty for ``import m``)."""

    module: str
    names: tuple[str, ...]
    line: int


def from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from <module> import ...`` in ``package`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    anchor = package.split(".")
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports(path: Path, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Every project module ``path`` imports, anywhere in its syntax tree. ``from a import b`` is an import of
    ``a.b`` when that is a module, else of ``a`` (taking the name ``b``)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(a.name, (), node.lineno) for a in node.names if module_file(a.name, root, packages)]
        elif isinstance(node, ast.ImportFrom):
            base = from_module(node, package)
            if not module_file(base, root, packages):
                continue
            names = []
            for a in node.names:
                if a.name != "*" and module_file(f"{base}.{a.name}", root, packages):
                    found.append(Import(f"{base}.{a.name}", (), node.lineno))
                else:
                    names.append(a.name)
            if names:
                found.append(Import(base, tuple(names), node.lineno))
    return found


def project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of the project packages: name -> file."""
    return {module_name(f, root): f for p in packages for f in sorted((root / p).rglob("*.py")) if IGNORED[0] not in f.parts}


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (no edge to the packages above them: those are not imports of
    their children, and a package's ``__init__`` that imports its own modules would otherwise form a cycle)."""
    return {m: {i.module for i in imports(f, root, packages)} for m, f in project_modules(root, packages).items()}


def closure(entries: list[str], root: Path = ROOT, excluded: tuple[Exclusion, ...] = EXCLUDED) -> set[str]:
    """Project files (posix, relative to ``root``) that running ``entries`` imports, less :data:`EXCLUDED` edges."""
    cut = {(e.importer, e.imported) for e in excluded}
    seen: set[str] = set()
    files: set[str] = set()
    todo = [m for e in entries for m in with_parents(e)]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        f = module_file(mod, root)
        if f is None:
            continue
        files.add(f.relative_to(root).as_posix())
        for imp in imports(f, root):
            if (mod, imp.module) not in cut:
                todo += [m for m in with_parents(imp.module) if m not in seen]
    return files


# ---------------------------------------------------------------------------------------------- a stage's deps
def entry_modules(cmd: str | list[str], root: Path = ROOT) -> list[str]:
    """The project modules a stage's ``cmd`` runs with ``python -m``."""
    out = []
    for c in [cmd] if isinstance(cmd, str) else cmd:
        argv = shlex.split(c)
        out += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m" and module_file(argv[i + 1], root)]
    return out


def _files_under(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if f.is_file() and not set(IGNORED) & set(f.parts) and f.suffix not in IGNORED_SUFFIXES]


def collapse(files: set[str], root: Path = ROOT) -> list[str]:
    """``files`` as DVC deps, sorted: a folder whose every file is in ``files`` is listed as the folder
    (the outermost such folder below a top-level package)."""

    def whole(folder: Path) -> bool:
        inside = _files_under(folder)
        return bool(inside) and all(f.relative_to(root).as_posix() in files for f in inside)

    out = set()
    for f in files:
        parts = Path(f).parts
        dep = f
        for depth in range(2, len(parts)):  # never a top-level package itself
            if whole(root.joinpath(*parts[:depth])):
                dep = "/".join(parts[:depth])
                break
        out.add(dep)
    return sorted(out)


def stage_code_deps(cmd: str | list[str], root: Path = ROOT) -> list[str]:
    entries = entry_modules(cmd, root)
    if not entries:
        raise ValueError(f"no project module found in the command {cmd!r}")
    return collapse(closure(entries, root), root)


# ---------------------------------------------------------------------------------------------- dvc.yaml
_STAGE = re.compile(r"^  (?P<name>[A-Za-z_][\w-]*):\s*$")
_DEPS = re.compile(r"^    deps:\s*$")
_ITEM = re.compile(r"^      - (?P<value>\S+)\s*$")


def _is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


def render(text: str, root: Path = ROOT) -> str:
    """dvc.yaml ``text`` with each stage's code deps replaced by the generated ones, written where its first
    code dep was (the top of ``deps`` if it had none); every other line is kept as it is."""
    stages = yaml.safe_load(text)["stages"]
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage, in_deps, placed = None, False, False
    for line in lines:
        m = _STAGE.match(line)
        if m:
            stage, in_deps = m.group("name"), False
        elif in_deps and line.strip() and not line.startswith("      ") and not line.lstrip().startswith("#"):
            in_deps = False
        if stage in stages and _DEPS.match(line):
            in_deps, placed = True, False
            out.append(line)
            continue
        item = _ITEM.match(line) if in_deps else None
        if item and _is_code(item.group("value")):
            if not placed:
                out += [f"      - {d}\n" for d in stage_code_deps(stages[stage]["cmd"], root)]
                placed = True
            continue
        if in_deps and not placed and item:  # a stage whose deps start with a non-code dep: code deps first
            out += [f"      - {d}\n" for d in stage_code_deps(stages[stage]["cmd"], root)]
            placed = True
        out.append(line)
    return "".join(out)


def code_deps_of(text: str) -> dict[str, list[str]]:
    """stage -> its code deps as ``text`` (dvc.yaml) lists them."""
    stages = yaml.safe_load(text)["stages"]
    return {
        name: [d for d in (x if isinstance(x, str) else next(iter(x)) for x in s.get("deps", [])) if _is_code(d)]
        for name, s in stages.items()
    }


def differences(current: str, generated: str) -> list[str]:
    """One line per stage whose code deps differ: what ``--write`` adds and removes."""
    have, want = code_deps_of(current), code_deps_of(generated)
    out = []
    for name in want:
        add, drop = sorted(set(want[name]) - set(have[name])), sorted(set(have[name]) - set(want[name]))
        if add or drop or have[name] != want[name]:
            out.append(f"  {name}: " + (f"add {add} " if add else "") + (f"remove {drop}" if drop else "" if add else "order"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.deps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's code deps differ from the generated ones (default)")
    mode.add_argument("--write", action="store_true", help="write the generated code deps into dvc.yaml")
    ap.add_argument("--dvc-yaml", default=str(ROOT / "dvc.yaml"))
    args = ap.parse_args(argv)
    path = Path(args.dvc_yaml)
    current = path.read_text(encoding="utf-8")
    generated = render(current)
    if args.write:
        if generated != current:
            path.write_text(generated, encoding="utf-8")
            print(f"wrote the code deps of {path}:\n" + "\n".join(differences(current, generated)))
        else:
            print(f"{path}: code deps up to date")
        return 0
    if generated != current:
        print(
            f"{path}: code deps differ from the stages' imports; run `python -m pipeline.deps --write`:\n"
            + "\n".join(differences(current, generated)),
            file=sys.stderr,
        )
        return 1
    print(f"{path}: code deps up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
