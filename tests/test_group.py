"""Parent runs (pipeline/tracking/parent.py) through the real ``python -m pipeline.run``, ``dvc repro`` and ``dvc exp run``
on a pipeline of small stand-in stages that open real :class:`pipeline.tracking.tracker.Tracker` runs in a sqlite store
(checked through MLflow's client): nesting under the parent, cached stages listed with their run ids, plain
``dvc repro`` without a parent. The real stages' runs are checked the same way in tests/test_pipeline.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.tracking.parent import ROLE_TAG, STAGE_TIMES_FILE, STAGES_FILE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A stage: one Tracker run (tags dvc.stage from DVC), its run_info.json in its out folder; the finetune
# stand-in also writes what the report would, reports/summary.json and the headline reports/metrics.json.
# Three stages (tracked, untracked, tracked) keep each repro short: every stage process imports MLflow.
STAGE = """
import json, sys
from pathlib import Path
import yaml
from pipeline.tracking.tracker import Tracker
out = Path(sys.argv[1])
lr = yaml.safe_load(open("params.yaml"))["train"]["loop"]["lr"]
with Tracker("probe", "bilora", {"lr": lr}) as t:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_info.json").write_text(json.dumps(t.info()))
    if len(sys.argv) > 2:
        Path("reports").mkdir(exist_ok=True)
        Path("reports/summary.json").write_text(json.dumps({"sst2.lora": {"main_metric": "accuracy", "mean": 0.5 + lr, "std": 0.0, "n_seeds": 1, "median_step_time": 0.1}}))
        Path("reports/metrics.json").write_text(json.dumps({"sst2-lora-0": {"test": 0.5 + lr}}))
"""
DVC_YAML = {
    "stages": {
        "prepare": {
            "cmd": "python stage.py artifacts/data",
            "deps": ["stage.py"],
            "params": ["data.train_subset"],
            "outs": ["artifacts/data"],
        },
        "configure": {
            "cmd": "python -c \"import pathlib; pathlib.Path('artifacts/runs').mkdir(parents=True, exist_ok=True); pathlib.Path('artifacts/runs/x.json').write_text('{}')\"",
            "params": ["train.loop.lr"],
            "outs": ["artifacts/runs"],
        },
        "finetune": {
            "cmd": "python stage.py artifacts/finetune report",
            "deps": ["stage.py", "artifacts/data", "artifacts/runs"],
            "params": ["train.loop.lr"],
            "outs": ["artifacts/finetune", {"reports/summary.json": {"cache": False}}],
            "metrics": [{"reports/metrics.json": {"cache": False}}],
        },
    }
}
TRACKED = {"prepare", "finetune"}


def make_repo(tmp: Path) -> Path:
    repo = tmp / "repo"
    src, dst = ROOT / "data" / "raw" / "glue" / "SST-2", repo / "data" / "raw" / "glue" / "SST-2"
    dst.mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):  # pipeline.run checks the data sources before dvc repro
        (dst / f).write_text("".join((src / f).read_text(encoding="utf-8").splitlines(keepends=True)[:41]), encoding="utf-8")
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    (repo / ".dvcignore").write_text("mlflow.db\nmlruns/\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@t"],
        ["git", "config", "user.name", "t"],
        [dvc(), "init", "-q"],
        [dvc(), "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, env=env(), capture_output=True)
    return repo


def dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "BILORA_"))}
    e.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PATH=str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", ""))
    return e


def run(repo: Path, *cmd: str) -> str:
    r = subprocess.run(list(cmd), cwd=repo, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def set_lr(repo: Path, lr: float) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["train"]["loop"]["lr"] = lr
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def runs(repo: Path) -> list:
    c = client(repo)
    return c.search_runs([c.get_experiment_by_name("bilora").experiment_id], max_results=1000)


def parents(repo: Path, role: str) -> list:
    return sorted((r for r in runs(repo) if r.data.tags.get(ROLE_TAG) == role), key=lambda r: r.info.start_time)


def children(repo: Path, parent_id: str) -> dict[str, str]:
    return {r.data.tags["dvc.stage"]: r.info.run_id for r in runs(repo) if r.data.tags.get("mlflow.parentRunId") == parent_id}


def listing(repo: Path, parent_id: str) -> dict[str, dict]:
    from mlflow.artifacts import load_dict

    return load_dict(client(repo).get_run(parent_id).info.artifact_uri + "/" + STAGES_FILE)


def test_pipeline_run_nests_its_stage_runs_lists_cached_ones_and_plain_repro_has_no_parent(tmp_path):
    repo = make_repo(tmp_path)
    out = run(repo, sys.executable, "-m", "pipeline.run")
    assert [line for line in out.splitlines() if line.startswith("stage ")] == [
        "stage 1 of 3: prepare",
        "stage 2 of 3: configure",
        "stage 3 of 3: finetune",
    ]
    assert "where the time went" in out.split("bilora summary")[-1]  # the last table: after the summary
    (p1,) = parents(repo, "run")
    assert p1.info.status == "FINISHED" and p1.data.tags["git.commit"]
    first = children(repo, p1.info.run_id)
    assert set(first) == TRACKED
    stages = listing(repo, p1.info.run_id)
    assert stages == {**{s: {"status": "ran", "run_id": first[s]} for s in TRACKED}, "configure": {"status": "untracked", "run_id": None}}
    c = client(repo)
    arts = {a.path for a in c.list_artifacts(p1.info.run_id)} | {a.path for a in c.list_artifacts(p1.info.run_id, "reports")}
    assert {"params.yaml", "summary_table.json", "reports/summary.json", STAGES_FILE, STAGE_TIMES_FILE} <= arts
    times = json.loads(Path(c.download_artifacts(p1.info.run_id, STAGE_TIMES_FILE, str(tmp_path))).read_text())
    assert [row[:2] for row in times["data"]] == [
        ["checks", ""],
        ["dvc start", ""],
        ["prepare", "ran"],
        ["configure", "ran"],
        ["finetune", "ran"],
    ]
    assert p1.data.metrics == {"sst2-lora-0.test": 0.5 + 1e-3}  # the headline metrics file, as parent metrics
    assert json.loads((repo / "artifacts" / "finetune" / "run_info.json").read_text())["parent_run_id"] == p1.info.run_id

    # A train param: finetune re-runs under a new parent; prepare is listed as cached with its first run id.
    set_lr(repo, 2e-3)
    out = run(repo, sys.executable, "-m", "pipeline.run")
    assert [line for line in out.splitlines() if line.startswith("stage ")] == ["stage 2 of 3: configure", "stage 3 of 3: finetune"]
    p1_, p2 = parents(repo, "run")
    second = children(repo, p2.info.run_id)
    assert set(second) == {"finetune"} and p2.info.status == "FINISHED"
    stages = listing(repo, p2.info.run_id)
    assert stages["prepare"] == {"status": "cached", "run_id": first["prepare"]}
    assert stages["finetune"] == {"status": "ran", "run_id": second["finetune"]} and stages["configure"]["status"] == "untracked"
    assert p2.data.metrics == {"sst2-lora-0.test": 0.5 + 2e-3}

    # Plain dvc repro: runs as before, none nested, no new parent.
    set_lr(repo, 3e-3)
    run(repo, dvc(), "repro")
    assert len(parents(repo, "run")) == 2 and not parents(repo, "exp")
    plain = [r for r in runs(repo) if r.data.tags.get("dvc.stage") in TRACKED and "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["dvc.stage"] for r in plain] == ["finetune"]


def test_dvc_exp_run_gets_one_parent_per_experiment(tmp_path):
    repo = make_repo(tmp_path)
    run(repo, dvc(), "exp", "run", "-S", "train.loop.lr=0.004")
    (p1,) = parents(repo, "exp")
    name = p1.data.tags["dvc.exp"]
    assert name and p1.info.run_name == f"exp:{name}" and p1.info.status == "FINISHED"
    assert name in run(repo, dvc(), "exp", "list", "--name-only")
    first = children(repo, p1.info.run_id)
    assert set(first) == TRACKED  # the first stage made the parent, the others found it
    assert all(r.data.tags["dvc.exp"] == name for r in runs(repo) if r.info.run_id in first.values())
    assert listing(repo, p1.info.run_id) == {
        **{s: {"status": "ran", "run_id": first[s]} for s in TRACKED},
        "configure": {"status": "untracked", "run_id": None},
    }
    assert "params.yaml" in {a.path for a in client(repo).list_artifacts(p1.info.run_id)}

    # A second experiment: its own parent; prepare is cached and listed with the first experiment's run id.
    run(repo, dvc(), "exp", "run", "-S", "train.loop.lr=0.005")
    p1_, p2 = parents(repo, "exp")
    assert p2.data.tags["dvc.exp"] != name and p2.info.status == "FINISHED"
    assert set(children(repo, p2.info.run_id)) == {"finetune"}
    assert listing(repo, p2.info.run_id)["prepare"] == {"status": "cached", "run_id": first["prepare"]}
    assert p2.data.metrics == {"sst2-lora-0.test": 0.505}
    assert not parents(repo, "run")
