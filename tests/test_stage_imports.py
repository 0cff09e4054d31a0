"""Stage start-up costs what the stage needs: a stage that neither trains nor evaluates imports no training stack.

Every stage validates ``params.yaml`` first, and the schema reads the library's settings from torch-free
modules (``bilora/config.py``, ``bilora/sharpness/config.py``), so validating imports no torch. Each check
runs in a fresh interpreter and lists the heavy packages in ``sys.modules``; reports/stage_imports.md has
the import times these choices buy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "mlflow", "datasets", "matplotlib", "bilora.methods", "bilora.train")


def loaded(code: str, cwd: Path = ROOT) -> list[str]:
    """The :data:`HEAVY` modules loaded after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    r = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module, allowed",
    [
        ("stages.configure", ()),
        ("stages.report", ("matplotlib",)),  # the charts
        ("pipeline.validate", ()),
        ("pipeline.run", ()),
        # the tokenizer (transformers, which imports torch) and the seeded split (torch.randperm) are prepare's work
        ("stages.prepare", ("torch", "transformers", "datasets")),
        # both check their inputs first (a bad one exits in about a second) and import the model stack in main()
        ("stages.load_base", ()),
        ("stages.finetune", ()),
        # folding the adapter into the base is merge's work (peft, and bitsandbytes for the nf4 round trip), as is
        # scoring the check examples (datasets); it loads no training method, loop, MLflow or plotting at import
        ("stages.merge", ("torch", "transformers", "peft", "bitsandbytes", "datasets")),
    ],
)
def test_a_stage_that_does_not_train_imports_no_training_stack(module, allowed):
    assert sorted(set(loaded(f"import {module}")) - set(allowed)) == []


def test_validating_params_and_writing_the_run_files_imports_no_torch(tmp_path):
    # configure's whole run (validate params.yaml, resolve every run, write artifacts/runs/) in a scratch folder
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom stages.configure import main\nmain(['--params', {str(ROOT / 'params.yaml')!r}])"
    assert loaded(code, cwd=tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "artifacts" / "runs").glob("*.json"))
