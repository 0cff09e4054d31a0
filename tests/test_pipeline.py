"""The real ``dvc repro`` on a tiny config in a temporary git repo: outputs, MLflow runs, granular invalidation."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(tasks=["sst2"], train_subset=88, max_length=32, test_subset=40)
    raw["train"].update(methods=["lora", "bilora"], seeds=[0])
    raw["train"]["loop"].update(max_steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    raw["eval"].update(train_subset=16, batch_size=32)
    raw["eval"]["sharpness"].update(
        examples=16, metric_examples=16, spaces=["full", "lora"], radii=[0.05], n_directions=1, attack_alphas=[0.0, 1.0], curve_points=3
    )  # both spaces (the default measures full only)
    raw["merge"].update(task="sst2", method="bilora", seed=0, check_examples=8)
    return raw


def make_repo(tmp: Path, params: dict) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    for d in ("bilora", "pipeline", "stages"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "raw" / "glue" / "SST-2", repo / "data" / "raw" / "glue" / "SST-2")
    for f in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = run_env(repo)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@t"],
        ["git", "config", "user.name", "t"],
        [dvc_bin(), "init", "-q"],
        [dvc_bin(), "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    return repo


def dvc_bin() -> str:
    return str(Path(sys.executable).parent / "dvc")


def run_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(repo), OMP_NUM_THREADS="1")  # one thread per stage: xdist runs a test per core
    return env


def repro(repo: Path) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pipeline.run"], cwd=repo, env=run_env(repo), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return re.findall(r"Running stage '([^']+)'", r.stdout + r.stderr)


def dvc(repo: Path, *args: str) -> str:
    env = run_env(repo)
    env["PATH"] = str(Path(dvc_bin()).parent) + os.pathsep + env.get("PATH", "")  # stages run in this venv
    r = subprocess.run([dvc_bin(), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def mlflow_runs(repo: Path) -> list[tuple[str, dict]]:
    con = sqlite3.connect(repo / "mlflow.db")
    runs = con.execute("select run_uuid, status from runs").fetchall()
    out = []
    for run_id, status in runs:
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
        tags["_status"], tags["_id"] = status, run_id
        tags["_metrics"] = {k for (k,) in con.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
        tags["_params"] = con.execute("select count(*) from params where run_uuid=?", (run_id,)).fetchone()[0]
        out.append((tags.get("dvc.stage"), tags))
    return out


def test_dvc_repro_end_to_end_and_granular_invalidation(tmp_path):
    from tests.test_logged_models import check_stage_logged_models

    params = tiny_params()
    params["tracking"]["register_model"] = "bilora-sst2"
    repo = make_repo(tmp_path, params)
    ran = repro(repo)
    expected = {
        "prepare",
        "load_base",
        "configure",
        "finetune@sst2-lora-0",
        "finetune@sst2-bilora-0",
        "evaluate@sst2-lora-0",
        "evaluate@sst2-bilora-0",
        "merge",
        "report",
    }
    assert set(ran) == expected

    # Outputs of every stage.
    for run in ("sst2-lora-0", "sst2-bilora-0"):
        adapter = repo / "artifacts" / "finetune" / run / "adapter"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        assert (adapter / "bilora_config.json").is_file()
        assert (repo / "metrics" / f"{run}.json").is_file()
    assert (repo / "artifacts" / "base" / "quant_report.json").is_file()
    assert (repo / "artifacts" / "merged" / "model" / "config.json").is_file()
    for f in ("report.md", "loss_curves.png", "summary.json", "attack_curves.png", "landscape_1d.png", "metric_vs_sharpness.png"):
        assert (repo / "reports" / f).is_file()
    metrics = __import__("json").loads((repo / "metrics" / "sst2-bilora-0.json").read_text())
    assert {"full.random.r0.05.mean", "lora.random.r0.05.mean", "full.attack.a1.accuracy"} <= set(metrics["sharpness"])
    assert (repo / "artifacts" / "eval" / "sst2-bilora-0" / "sharpness.json").is_file()

    # One MLflow run per stage execution, finished, tagged, with params and metrics, nested under the
    # parent run of this `python -m pipeline.run` (tests/test_group.py checks the parent in detail).
    runs = mlflow_runs(repo)
    (parent,) = [t for s, t in runs if t.get("bilora.parent") == "run"]
    runs = [(s, t) for s, t in runs if "bilora.parent" not in t]
    assert sorted(s for s, _ in runs) == sorted(expected - {"configure"})  # configure only resolves settings
    for stage, tags in runs:
        assert tags["_status"] == "FINISHED" and tags["git.commit"] and tags["_params"] > 0, stage
        assert tags["mlflow.parentRunId"] == parent["_id"], stage
    headline = __import__("json").loads((repo / "reports" / "metrics.json").read_text())
    assert set(headline) == {"sst2-lora-0", "sst2-bilora-0"} and all(set(v) == {"test", "sharp"} for v in headline.values())
    assert {"sst2-lora-0.test", "sst2-bilora-0.sharp"} <= parent["_metrics"]
    ft = dict(runs)["finetune@sst2-bilora-0"]
    assert ft["method"] == "bilora" and ft["seed"] == "0" and {"loss", "aux_norm"} <= ft["_metrics"]
    # MLflow logged models of the adapter and the merged model (registered), evaluate's scores on the adapter.
    check_stage_logged_models(repo, "sst2-bilora-0", "bilora", params["train"]["lora"]["r"], "bilora-sst2")

    # Granular invalidation, read from DVC's own decision: `dvc status` names the stages whose deps
    # or params changed, exactly the ones `dvc repro` would start from (then their downstream).
    # configure runs first, since the finetune stages depend on the run files it writes.
    # (Re-training per edit is tested once, for one method's setting, in test_run_settings_dvc.py.)
    original = yaml.safe_dump(params, sort_keys=False)

    def stale_after(edit) -> set[str]:
        edited = yaml.safe_load(original)
        edit(edited)
        (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
        dvc(repo, "repro", "configure")
        return {m for m in re.findall(r"^(\S+):\s*$", dvc(repo, "status"), re.M)}

    # An evaluation-only parameter re-evaluates and retrains nothing.
    assert stale_after(lambda q: q["eval"].update(batch_size=16)) == {"evaluate@sst2-lora-0", "evaluate@sst2-bilora-0"}
    # A training parameter retrains every run but neither re-prepares data nor re-quantizes the base.
    assert stale_after(lambda q: q["train"]["loop"].update(lr=2e-3)) == {"finetune@sst2-lora-0", "finetune@sst2-bilora-0"}
    # A Bi-LoRA-only parameter retrains Bi-LoRA only.
    assert stale_after(lambda q: q["train"]["bilora"].update(rho=0.1)) == {"finetune@sst2-bilora-0"}

    # Back on the trained params, with more methods: one short real MiniLM run each through the
    # pipeline (sharpness included); configure rewrites byte-identical files for the finished runs, so
    # adding methods neither retrains nor re-evaluates them.
    # (Two of the other four, whose training and export differ most from LoRA's: EFlat-LoRA's perturbed
    # step, bi-level LoRA's two levels; tests/test_minilm.py trains and exports all of them on the real
    # nf4 MiniLM in-process.)
    others = ["eflat_lora", "bilevel_lora"]
    params["train"]["methods"] = ["lora", "bilora", *others]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = repro(repo)
    assert {f"finetune@sst2-{m}-0" for m in others} | {f"evaluate@sst2-{m}-0" for m in others} <= set(ran)
    assert not {"finetune@sst2-lora-0", "finetune@sst2-bilora-0", "evaluate@sst2-lora-0", "evaluate@sst2-bilora-0"} & set(ran)
    for m in others:
        assert (repo / "artifacts" / "finetune" / f"sst2-{m}-0" / "adapter" / "adapter_model.safetensors").is_file()
        metrics = __import__("json").loads((repo / "metrics" / f"sst2-{m}-0.json").read_text())
        assert "accuracy" in metrics["test"] and "full.random.r0.05.mean" in metrics["sharpness"]
