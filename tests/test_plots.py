"""``dvc plots show`` renders offline: the HTML loads vega from local files, never from a CDN."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_offline_plots_reference_no_remote_script(tmp_path):
    repo = tmp_path / "repo"
    (repo / "reports" / "history").mkdir(parents=True)
    for run, scale in (("sst2-lora-0", 1.0), ("sst2-bilora-0", 0.9)):
        (repo / "reports" / "history" / f"{run}.json").write_text(json.dumps([{"step": i, "loss": scale / i} for i in range(1, 6)]))
    # The real dvc.yaml's plots section, so the test follows what users get.
    import yaml

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [p for p in plots if "history" in str(p)]}))
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "pipeline.plots", "-o", "out"], cwd=repo, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    html = (repo / "out" / "index.html").read_text()
    srcs = re.findall(r"<script[^>]*src=[\"']([^\"']+)", html)
    assert sorted(srcs) == ["vega-embed.min.js", "vega-lite.min.js", "vega.min.js"]
    assert not re.search(r"https?://", " ".join(srcs))
    assert "cdn" not in html.lower().split("<body>")[0]
    for s in srcs:
        assert (repo / "out" / s).stat().st_size > 50_000
    assert "sst2-bilora-0" in html and "loss" in html  # the data made it into the spec
