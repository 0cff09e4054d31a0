"""Every project file a DVC stage runs is covered by one of that stage's ``deps`` in dvc.yaml.

For each stage the entry modules are the ``python -m <module>`` targets of its ``cmd`` that live in
the project, plus ``stages.<stage name>`` when that module exists (``stages.launch`` runs the
training stage by name, through ``importlib`` or a torchrun re-exec, which a static walk cannot
see). From the entries, ``ast`` follows every project import (``bilora``, ``pipeline``, ``stages``)
at any depth in a file (function-local imports and ``TYPE_CHECKING`` blocks included): ``import
a.b``, ``from a import b`` where ``b`` may be a submodule, and relative imports; importing a
submodule also runs its packages' ``__init__.py``, so those are in the closure too. Third-party
imports are ignored. A dep covers a file when it is that file or a folder above it.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bilora", "pipeline", "stages")
# Data files under pipeline/ that no stage reads: a stage must not depend on them (editing a preset
# or the offline vega bundle would re-run the pipeline), so the `pipeline` folder itself is no dep.
NOT_STAGE_INPUTS = ("pipeline/presets", "pipeline/vega")


def module_file(module: str) -> Path | None:
    """The file that defines ``module`` in this project (``a/b.py`` or ``a/b/__init__.py``), else None."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a submodule runs every package above it."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` (defining ``module``) may import, found anywhere in its syntax tree."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                if node.level > 1:
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base:
                continue
            found.update(with_parents(base))
            # `from a import b`: b is a submodule or a name defined in a; keep it if it is a module.
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def closure(entries: list[str]) -> set[str]:
    """Project files (posix paths relative to the repo root) reachable from ``entries`` by import."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = [m for e in entries for m in with_parents(e)]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        f = module_file(mod)
        if f is None:
            continue
        files.add(f.relative_to(ROOT).as_posix())
        todo.extend(imported_modules(f, mod) - seen)
    return files


def load_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def entry_modules(name: str, stage: dict) -> list[str]:
    cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
    entries = []
    for cmd in cmds:
        argv = shlex.split(cmd)
        entries += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m" and module_file(argv[i + 1])]
    if module_file(f"stages.{name}") and f"stages.{name}" not in entries:
        entries.append(f"stages.{name}")
    return entries


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def stage_deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def test_every_stage_depends_on_every_project_file_it_imports():
    missing = {}
    for name, stage in load_stages().items():
        entries = entry_modules(name, stage)
        assert entries, f"stage {name!r}: no project module found in its cmd {stage['cmd']!r}"
        deps = stage_deps(stage)
        gaps = sorted(f for f in closure(entries) if not covered(f, deps))
        if gaps:
            missing[name] = gaps
    if missing:
        lines = [f"  {name}: " + ", ".join(files) for name, files in missing.items()]
        pytest.fail(
            "dvc.yaml: these stages import project files that none of their deps covers, so editing them "
            "would not re-run the stage. Add each file (or its package folder) to the stage's deps in dvc.yaml:\n" + "\n".join(lines),
            pytrace=False,
        )


def test_code_deps_exist_are_imported_and_skip_files_no_stage_reads():
    bad = []
    for name, stage in load_stages().items():
        files = closure(entry_modules(name, stage))
        for d in stage_deps(stage):
            if d.split("/")[0] not in PACKAGES:
                continue
            if not (ROOT / d).exists():
                bad.append(f"{name}: dep {d!r} does not exist; remove it from deps in dvc.yaml")
            elif not any(covered(f, [d]) for f in files):
                bad.append(f"{name}: dep {d!r} is not imported by the stage; remove it from deps in dvc.yaml")
            for extra in NOT_STAGE_INPUTS:
                if covered(extra, [d]):
                    bad.append(f"{name}: dep {d!r} covers {extra}, which no stage reads; list the code files instead")
    assert not bad, "\n".join(bad)


def test_folder_deps_ignore_bytecode():
    # A folder dep is hashed file by file: __pycache__ (written when the stage imports the code,
    # and rewritten after a checkout touches mtimes) would change the hash on every machine.
    folders = {d for s in load_stages().values() for d in stage_deps(s) if d.split("/")[0] in PACKAGES and (ROOT / d).is_dir()}
    if folders:
        ignored = (ROOT / ".dvcignore").read_text(encoding="utf-8").split()
        assert "__pycache__/" in ignored and "*.pyc" in ignored, f"folder deps {sorted(folders)}: add __pycache__/ and *.pyc to .dvcignore"


def test_closure_follows_submodules_relative_and_stage_imports():
    # Guards the walk itself: what the issue found missing must be in the closure.
    finetune = closure(entry_modules("finetune", load_stages()["finetune"]))
    assert {
        "stages/finetune.py",
        "stages/launch.py",
        "bilora/fused.py",
        "pipeline/config/schema.py",
        "bilora/methods/flat_lora.py",
        "bilora/__init__.py",
        "bilora/methods/__init__.py",
    } <= finetune
    evaluate = closure(["stages.evaluate"])
    assert {"bilora/sharpness/measure.py", "bilora/sharpness/ball.py", "bilora/layers.py", "bilora/base.py"} <= evaluate
    # sharpness takes its 4-bit helpers from bilora/layers.py, not from a method file
    assert not any(f.startswith("bilora/methods/") for f in evaluate), sorted(evaluate)


def test_no_stage_imports_another_stage():
    for name, stage in load_stages().items():
        entries = entry_modules(name, stage)
        others = {f for f in closure(entries) if f.startswith("stages/") and f not in {f"stages/{name}.py", "stages/__init__.py"}}
        # finetune's command is the launcher; evaluate_only's command is stages.evaluate itself (same code, eval-only datasets)
        allowed = {"stages/launch.py"} if name == "finetune" else {module_file(m).relative_to(ROOT).as_posix() for m in entries}
        assert others <= allowed, f"stage {name!r} imports {sorted(others - allowed)}"
