"""A real ``dvc repro`` in a temporary repo: one method's setting re-runs only that method's runs.

``configure`` resolves every run's settings into ``artifacts/runs/<run>.json`` and each
``finetune@<run>`` depends on its own file (not on the ``train`` sections), so editing
``train.flat_lora.sigma`` re-runs configure and ``finetune@sst2-flat_lora-0`` only.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import dvc_bin, make_repo, run_env, tiny_params

pytestmark = pytest.mark.slow


def dvc(repo, *args: str) -> str:
    env = run_env(repo)
    env["PATH"] = str(Path(dvc_bin()).parent) + os.pathsep + env.get("PATH", "")  # stages run in this venv
    r = subprocess.run([dvc_bin(), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def changed_stages(repo) -> set[str]:
    """Stages `dvc status` reports as changed (its top-level `name:` lines)."""
    return {m for m in re.findall(r"^(\S+):\s*$", dvc(repo, "status", "--with-deps", "finetune"), re.M)}


def test_one_method_setting_reruns_only_that_methods_finetune(tmp_path):
    params = tiny_params()
    params["train"]["methods"] = ["flat_lora", "bilora_rho0.2"]
    params["train"]["variants"] = {"bilora_rho0.2": {"method": "bilora", "rho": 0.2}}
    params["train"]["loop"].update(max_steps=1, checkpoint_every=0)
    params["merge"].update(method="flat_lora")
    repo = make_repo(tmp_path, params)
    runs = ["sst2-flat_lora-0", "sst2-bilora_rho0.2-0"]
    assert ran(dvc(repo, "repro", "finetune")) == {"prepare", "load_base", "configure"} | {f"finetune@{r}" for r in runs}
    before = {r: (repo / "artifacts" / "runs" / f"{r}.json").read_bytes() for r in runs}
    cfg = yaml.safe_load(before["sst2-bilora_rho0.2-0"])
    assert cfg["method_key"] == "bilora" and cfg["method_config"]["rho"] == 0.2
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert "params" not in lock["finetune@sst2-flat_lora-0"]  # no train section recorded for a run
    assert "artifacts/runs/sst2-flat_lora-0.json" in {d["path"] for d in lock["finetune@sst2-flat_lora-0"]["deps"]}

    params["train"]["flat_lora"]["sigma"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed_stages(repo) == {"configure"}  # its outputs are not rewritten yet
    assert ran(dvc(repo, "repro", "finetune")) == {"configure", "finetune@sst2-flat_lora-0"}
    after = {r: (repo / "artifacts" / "runs" / f"{r}.json").read_bytes() for r in runs}
    assert after["sst2-bilora_rho0.2-0"] == before["sst2-bilora_rho0.2-0"]
    assert yaml.safe_load(after["sst2-flat_lora-0"])["method_config"] == {"sigma": 0.1}

    # A variant's override makes that variant's run stale only. DVC decides what `repro` runs by this
    # same status check, so after configure has rewritten the files, status names the runs to re-train
    # (no second training needed to see it).
    params["train"]["variants"]["bilora_rho0.2"]["rho"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(dvc(repo, "repro", "configure")) == {"configure"}
    assert changed_stages(repo) == {"finetune@sst2-bilora_rho0.2-0"}
    assert ran(dvc(repo, "repro", "finetune")) == {"finetune@sst2-bilora_rho0.2-0"}
    assert "finetune" not in dvc(repo, "status", "--with-deps", "finetune").replace("Data and pipelines are up to date", "")
