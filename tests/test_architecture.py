"""The library is usable without DVC or MLflow: ``bilora`` never imports ``pipeline`` or ``stages``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"pipeline", "stages", "dvc", "mlflow", "pydantic", "rich"}


def test_no_forbidden_imports_in_source():
    bad = []
    for f in sorted((ROOT / "bilora").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_importing_every_bilora_module_loads_no_pipeline_code():
    mods = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "bilora").rglob("*.py")]
    mods = [m.removesuffix(".__init__") for m in mods]
    code = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in mods)
        + ("bad = sorted(m for m in sys.modules if m.split('.')[0] in %r)\nprint(bad)\nsys.exit(1 if bad else 0)\n" % (FORBIDDEN,))
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def _bilora_imports(f: Path) -> set[str]:
    """Absolute ``bilora.*`` modules a file imports (``from bilora import x`` counted as ``bilora.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bilora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("bilora"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_methods_and_sharpness_share_the_backend_not_each_other():
    # what methods and the sharpness code share lives in bilora.layers / bilora.adapters (PEFT's backend line):
    # no method file imports another method, and the measurement code imports no method at all
    methods = ROOT / "bilora" / "methods"
    method_files = {f"bilora.methods.{f.stem}" for f in methods.glob("*.py") if f.stem not in ("__init__", "method")}
    bad = []
    for f in sorted(methods.glob("*.py")):
        if f.stem in ("__init__", "method"):
            continue
        bad += [f"{f.name}: {m}" for m in _bilora_imports(f) & method_files if m != f"bilora.methods.{f.stem}"]
    for f in sorted((ROOT / "bilora").joinpath("sharpness").glob("*.py")):
        bad += [f"{f.name}: {m}" for m in _bilora_imports(f) if m.startswith("bilora.methods")]
    assert not bad, bad
