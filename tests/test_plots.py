"""``python -m pipeline.plots`` renders offline: the HTML loads vega from local files, never from a CDN, and in
headless Chromium every vega plot draws and every PNG loads with no request leaving the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def render(tmp_path: Path, pngs: bool = False) -> Path:
    """A repo with two training histories (and, with ``pngs``, the committed report PNGs) and the real
    dvc.yaml's plots section (so the test follows what users get); the page python -m pipeline.plots writes."""
    repo = tmp_path / "repo"
    (repo / "reports" / "history").mkdir(parents=True)
    for run, scale in (("sst2-lora-0", 1.0), ("sst2-bilora-0", 0.9)):
        (repo / "reports" / "history" / f"{run}.json").write_text(json.dumps([{"step": i, "loss": scale / i} for i in range(1, 6)]))
    import yaml

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    plots = [p for p in plots if "history" in str(p) or (pngs and str(p).endswith(".png"))]
    for p in plots:
        if isinstance(p, str):
            shutil.copy(ROOT / p, repo / p)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.plots", "-o", "out"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return repo / "out" / "index.html"


def test_offline_plots_reference_no_remote_script(tmp_path):
    page = render(tmp_path)
    html = page.read_text()
    srcs = re.findall(r"<script[^>]*src=[\"']([^\"']+)", html)
    assert sorted(srcs) == ["vega-embed.min.js", "vega-lite.min.js", "vega.min.js"]
    assert not re.search(r"https?://", " ".join(srcs))
    assert "cdn" not in html.lower().split("<body>")[0]
    for s in srcs:
        assert (page.parent / s).stat().st_size > 50_000
    assert "sst2-bilora-0" in html and "loss" in html  # the data made it into the spec


def test_plots_page_renders_in_headless_chromium(tmp_path):
    from tests.helpers.browser import chromium, open_page

    if chromium() is None:
        msg = "chromium is not installed (Debian: apt-get install -y chromium; the README's test command and .ci/run install it)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(msg)  # CI: the browser test must run
        pytest.skip(msg)
    page = render(tmp_path, pngs=True)
    html = page.read_text()
    got = open_page(page)
    embeds = re.findall(r"vegaEmbed\('([^']+)'", html)
    assert len(embeds) == 2 and sorted(e["el"] for e in got["embeds"]) == sorted(embeds)
    for e in got["embeds"]:  # a view with marks: the lines themselves, not only axes and grid (rule, text)
        assert "error" not in e and e["marks"].get("line", 0) > 0, e
    pngs = re.findall(r"<img src=\"([^\"]+)\"", html)
    assert len(pngs) == 5 and sorted(i["src"] for i in got["images"]) == sorted(
        pngs
    )  # loss, attack, landscape, metric vs sharpness, perturbation
    assert all(i["ok"] for i in got["images"]), got["images"]
    assert got["errors"] == []
    assert got["requests"] and all(u.startswith("file://") for u in got["requests"]), got["requests"]  # nothing left the machine
