"""dvc.yaml's code deps are exactly what ``python -m pipeline.deps --write`` generates from each stage's imports.

The import walk and the named exclusions live in :mod:`pipeline.deps`; these tests check dvc.yaml against it,
guard the walk itself (submodules, relative imports, the launcher's stage) and the exclusions (each one a real
import, none hiding code a stage runs), and that no module a stage imports hides an import behind ``importlib``.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import yaml

from pipeline import deps
from pipeline.deps import EXCLUDED, ROOT, closure, entry_modules, import_graph

# Dynamic imports a stage may make, each with its reason (anything else is a plain import, visible to pipeline.deps).
DYNAMIC_IMPORTS = {
    "pipeline/config/load.py": "train.plugins: user modules named in params.yaml, imported before validation (their code is the user's)",
    "bilora/sources.py": "base.source pypi:<package>: the base model's own package, named in params.yaml (not project code)",
    "pipeline/config/runs.py": "a plugin method's module (train.plugins), recorded in its run file and imported before its settings are built (the user's code)",
}


def load_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_closure(name: str) -> set[str]:
    return closure(entry_modules(load_stages()[name]["cmd"]))


def test_dvc_yaml_code_deps_are_the_generated_ones():
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    generated = deps.render(text)
    if generated != text:
        pytest.fail(
            "dvc.yaml: the code deps differ from the stages' imports; run `python -m pipeline.deps --write`:\n"
            + "\n".join(deps.differences(text, generated)),
            pytrace=False,
        )


def test_the_command_checks_and_writes(tmp_path):
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    stale = text.replace("      - stages/prepare.py\n", "", 1).replace(
        "      - pipeline/stage/runner.py\n", "      - pipeline/gone.py\n", 1
    )
    assert stale != text
    f = tmp_path / "dvc.yaml"
    f.write_text(stale)
    r = subprocess.run([sys.executable, "-m", "pipeline.deps", "--dvc-yaml", str(f)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "stages/prepare.py" in r.stderr and "pipeline/gone.py" in r.stderr, r.stderr
    assert deps.render(stale) == text  # comments, other deps, params and outs are untouched


def test_every_code_dep_exists_and_no_dep_covers_data_no_stage_reads():
    for name, stage in load_stages().items():
        for d in deps.code_deps_of((ROOT / "dvc.yaml").read_text())[name]:
            assert (ROOT / d).exists(), f"{name}: {d}"
            assert not any(x.startswith(d.rstrip("/") + "/") or x == d for x in ("pipeline/presets", "pipeline/vega")), f"{name}: {d}"


def test_folder_deps_ignore_bytecode():
    # A folder dep is hashed file by file: __pycache__ (written when the stage imports the code,
    # and rewritten after a checkout touches mtimes) would change the hash on every machine.
    folders = {d for ds in deps.code_deps_of((ROOT / "dvc.yaml").read_text()).values() for d in ds if (ROOT / d).is_dir()}
    if folders:
        ignored = (ROOT / ".dvcignore").read_text(encoding="utf-8").split()
        assert "__pycache__/" in ignored and "*.pyc" in ignored, f"folder deps {sorted(folders)}: add __pycache__/ and *.pyc to .dvcignore"


def test_closure_follows_submodules_relative_imports_and_the_launcher():
    finetune = stage_closure("finetune")
    assert {
        "stages/finetune.py",  # run by stages.launch (a plain import, or torchrun -m stages.finetune)
        "stages/launch.py",
        "bilora/fused.py",
        "pipeline/config/schema.py",
        "bilora/methods/flat_lora.py",
        "bilora/__init__.py",
        "bilora/methods/__init__.py",
        "pipeline/data/formats/chat.py",  # the formats registry imports every format
    } <= finetune
    evaluate = stage_closure("evaluate")
    assert {"bilora/sharpness/measure.py", "bilora/sharpness/ball.py", "bilora/layers.py", "bilora/base.py"} <= evaluate
    # sharpness takes its 4-bit helpers from bilora/layers.py, not from a method file
    assert not any(f.startswith("bilora/methods/") for f in evaluate), sorted(evaluate)


def test_exclusions_are_real_imports_with_reasons_and_keep_the_code_with_the_stages_that_run_it():
    graph = import_graph()
    for e in EXCLUDED:
        assert e.imported in graph.get(e.importer, set()), f"{e.importer} no longer imports {e.imported}: remove it from EXCLUDED"
        assert len(e.reason) > 40, e
    # what the schema reads only for its settings is not a dep of the stages that do not run it ...
    for name in ("prepare", "load_base", "report"):
        files = stage_closure(name)
        assert not {"bilora/train.py", "bilora/methods/__init__.py", "bilora/sharpness/config.py"} & files, (name, sorted(files))
    # ... and is one of those that do: configure resolves each run from the declarations alone (no training code),
    # finetune runs the code that uses them
    configure = stage_closure("configure")
    assert "bilora/config.py" in configure and not {"bilora/train.py", "bilora/methods/__init__.py"} & configure, sorted(configure)
    assert {"bilora/config.py", "bilora/train.py", "bilora/methods/__init__.py", "bilora/methods/lora.py"} <= stage_closure("finetune")
    assert "bilora/sharpness/config.py" in stage_closure("evaluate")


def test_no_module_a_stage_imports_hides_an_import():
    # importlib.import_module / __import__ with a computed name is invisible to the walk: allowed only where listed
    stage_files = set().union(*(stage_closure(n) for n in load_stages()))
    bad = []
    for f in sorted(stage_files):
        for node in ast.walk(ast.parse((ROOT / f).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("import_module", "__import__") and f not in DYNAMIC_IMPORTS:
                    bad.append(f"{f}:{node.lineno}")
    assert not bad, f"dynamic imports hide code from pipeline.deps; import plainly (or list a reason in DYNAMIC_IMPORTS): {bad}"


def test_no_stage_imports_another_stage():
    for name, stage in load_stages().items():
        entries = entry_modules(stage["cmd"])
        files = closure(entries)
        own = {deps.module_file(m).relative_to(ROOT).as_posix() for m in entries} | {"stages/__init__.py"}
        others = {f for f in files if f.startswith("stages/")} - own
        # finetune's command is the launcher, which runs stages/finetune.py
        allowed = {"stages/finetune.py"} if name == "finetune" else set()
        assert others <= allowed, f"stage {name!r} imports {sorted(others - allowed)}"
