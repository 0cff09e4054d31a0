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
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods) + (
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r)\nprint(bad)\nsys.exit(1 if bad else 0)\n" % (FORBIDDEN,)
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
