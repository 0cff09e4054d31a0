"""Static checks run by the suite: ruff's lint rules and its formatter (configured in pyproject.toml,
``[tool.ruff]``) over the repository, and pylint's duplicate-code check over the library, the pipeline and the stages, so a
block copied between files (the way the stages once repeated their setup) fails here, naming both places."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# astroid's dataclass transform infers field types, following imports into torch and transformers:
# with it a run takes ~2 min on 2 cores, without it ~5 s. duplicate-code compares lines and needs no inference.
_NO_DATACLASS_INFERENCE = (
    "import astroid; from astroid import nodes; from astroid.brain import brain_dataclasses as b; "
    "astroid.MANAGER.unregister_transform(nodes.ClassDef, b.dataclass_transform, b.is_decorated_with_dataclass)"
)
# A repeated block is 6 or more similar lines, imports, docstrings and comments aside.
DUPLICATE_CODE = [
    f"--init-hook={_NO_DATACLASS_INFERENCE}",
    "--disable=all",
    "--enable=duplicate-code",
    "--min-similarity-lines=6",
    "--ignore-imports=y",
    "--ignore-docstrings=y",
    "--ignore-comments=y",
    "--score=n",
]


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    assert importlib.util.find_spec(module), f"{module} is not installed: pip install -c constraints.txt -e '.[test]'"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_passes():
    res = _tool("ruff", "check", "--no-cache", ".")
    assert res.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix`):\n{res.stdout}{res.stderr}"


def test_ruff_format_is_applied():
    res = _tool("ruff", "format", "--check", "--no-cache", ".")
    assert res.returncode == 0, f"files not in ruff's format (run `ruff format .`):\n{res.stdout}{res.stderr}"


def test_no_duplicate_code_in_library_pipeline_and_stages():
    res = _tool("pylint", *DUPLICATE_CODE, "bilora", "pipeline", "stages")
    assert res.returncode == 0, (
        f"pylint duplicate-code: a block is repeated; move it into one function (pipeline/stage/runner.py for stage setup):\n{res.stdout}{res.stderr}"
    )
