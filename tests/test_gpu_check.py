"""bench/gpu_check.py rehearsed end to end on CPU (``--device cpu --tiny``): every row is written,
to the folder given (never reports/), and the script's import closure holds none of the packages
the GPU machine lacks (docs/decisions.md, "GPU machine")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU = ("pydantic", "dvc", "mlflow", "datasets", "gguf", "pipeline", "stages", "rich")

RUN = r"""
import runpy, sys
sys.argv = ["gpu_check", "--device", "cpu", "--tiny", "--out", sys.argv[1]]
try:
    runpy.run_module("bench.gpu_check", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
bad = sorted({m.split(".")[0] for m in sys.modules} & set(ABSENT))
print("FORBIDDEN", bad)
""".replace("ABSENT", repr(ABSENT_ON_GPU))


@pytest.mark.slow
def test_gpu_check_cpu_rehearsal(tmp_path):
    before = (ROOT / "reports" / "gpu.md").exists()
    r = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FORBIDDEN []" in r.stdout, r.stdout[-500:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    rows = data["rows"]
    methods = ["lora", "bilora_fused", "lora_sam", "flat_lora", "eflat_lora"]
    assert [(x["method"], x["checkpointing"]) for x in rows] == [(m, c) for c in (False, True) for m in methods]
    for x in rows:
        assert x["error"] is None and x["steps"] == 2
        assert x["step_time_s"] > 0 and x["tokens_per_s"] > 0 and x["peak_gib"] > 0 and x["predicted_gib"] > 0
        assert set(x["predicted_parts_gib"]) == {"weights", "adapters", "optimizer", "activations", "method_extras"}
    md = (tmp_path / "gpu.md").read_text()
    assert md.count("| tiny |") == len(rows)
    assert (ROOT / "reports" / "gpu.md").exists() == before  # the rehearsal never writes reports/
