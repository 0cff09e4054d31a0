"""Scale-out: a shared MLflow tracking server (``python -m pipeline.server``), a DVC remote shared by
two clones, and data-parallel training (2 gloo processes == 1 process with the same global batch)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import mlserver  # noqa: E402
from stagerun import ROOT, make_workdir, run_stage  # noqa: E402

from pipeline import server  # noqa: E402


# -- shared MLflow server -------------------------------------------------------------------------
def test_server_command_has_the_light_team_settings():
    args, extra = server.parse(
        ["--backend-store-uri", "sqlite:///x.db", "--artifacts-destination", "./a", "--port", "5001", "--", "--app-name", "basic-auth"]
    )
    cmd = server.server_command(args, extra)
    assert cmd[cmd.index("server") :] == [
        "server",
        "--backend-store-uri",
        "sqlite:///x.db",
        "--artifacts-destination",
        "./a",
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
        "--workers",
        "1",
        "--app-name",
        "basic-auth",
    ]
    assert server.server_env()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


@pytest.mark.slow
def test_stage_logs_to_the_shared_server(tmp_path):
    port = mlserver.free_port()
    home = tmp_path / "server"
    home.mkdir()
    log = tmp_path / "server.log"
    env = {**mlserver.clean_env(), "PYTHONPATH": str(ROOT)}
    proc = mlserver.start(
        [
            sys.executable,
            "-m",
            "pipeline.server",
            "--backend-store-uri",
            "sqlite:///mlflow-server.db",
            "--artifacts-destination",
            "./mlartifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log,
        cwd=home,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        mlserver.wait_healthy(proc, base, log)
        wd = make_workdir(tmp_path)
        r = run_stage(wd, "prepare", MLFLOW_TRACKING_URI=base)
        assert r.returncode == 0 and "warning: MLflow" not in r.stderr, r.stderr[-3000:]
        info = json.loads((wd / "artifacts" / "data" / "run_info.json").read_text())
        assert info["tracked"] is True and info["tracking_uri"] == base
        exps = json.load(urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=bilora", timeout=10))
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [exps["experiment"]["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.load(urllib.request.urlopen(req, timeout=10))["runs"]
        assert [r["info"]["run_id"] for r in runs] == [info["run_id"]]
        run = runs[0]
        assert run["info"]["status"] == "FINISHED"
        assert {t["key"]: t["value"] for t in run["data"]["tags"]}["dvc.stage"] == "prepare"
        assert any(m["key"].endswith("train_rows") for m in run["data"]["metrics"])
        # Artifacts went through the server's proxy into --artifacts-destination, not the client's disk.
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")
        assert list((home / "mlartifacts").rglob("data_stats.json")), sorted(str(p) for p in home.rglob("*"))[:50]
        assert (home / "mlflow-server.db").is_file() and not (wd / "mlflow.db").exists()
    finally:
        mlserver.stop(proc)
    assert proc.poll() is not None


# -- DVC remote shared by two clones --------------------------------------------------------------
def _git(repo: Path, *args: str) -> str:
    from test_pipeline import run_env

    r = subprocess.run(["git", *args], cwd=repo, env=run_env(repo), capture_output=True, text=True, check=True)
    return r.stdout


def _dvc(repo: Path, *args: str) -> str:
    from test_pipeline import dvc_bin, run_env

    r = subprocess.run([dvc_bin(), *args], cwd=repo, env=run_env(repo), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_dvc_remote_push_clone_pull_is_up_to_date(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_pipeline import make_repo, repro, tiny_params

    params = tiny_params()
    params["data"].update(train_subset=24, test_subset=16, max_length=16)
    params["train"].update(methods=["lora"])
    params["train"]["loop"].update(max_steps=2, checkpoint_every=0)
    params["eval"].update(train_subset=8)
    if isinstance(params["eval"].get("sharpness"), dict):
        params["eval"]["sharpness"]["enabled"] = False
    params["merge"].update(method="lora", check_examples=4)
    (tmp_path / "a").mkdir()
    first = make_repo(tmp_path / "a", params)
    remote = tmp_path / "remote"
    _dvc(first, "remote", "add", "-d", "local", str(remote))
    assert len(repro(first)) == 7  # prepare, load_base, configure, finetune, evaluate, merge, report
    # DVC-cached outputs go to the remote; dvc.lock, the remote config and the cache:false
    # outputs (metrics, reports) go to git.
    _dvc(first, "push")
    _git(first, "add", "-A")
    _git(first, "commit", "-qm", "results")
    assert not _git(first, "status", "--porcelain")
    tracked = _git(first, "ls-files").split()
    assert ".dvc/config" in tracked and "dvc.lock" in tracked and "metrics/sst2-lora-0.json" in tracked and "reports/report.md" in tracked
    assert not [f for f in tracked if f.startswith("artifacts/") and not f.endswith(".gitignore")], (
        "artifacts must travel through the DVC remote, not git"
    )

    second = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True, capture_output=True)
    assert "local" in _dvc(second, "remote", "list")
    _dvc(second, "pull")
    status = _dvc(second, "status")
    assert "up to date" in status, status
    assert repro(second) == []  # nothing re-runs on the second machine
    assert (second / "artifacts" / "finetune" / "sst2-lora-0" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        first / "artifacts" / "finetune" / "sst2-lora-0" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


# -- data parallel (2 gloo processes on CPU) ------------------------------------------------------
DDP_WORKER = ROOT / "tests" / "helpers" / "ddp_worker.py"
# 2 ranks vs 1 process: same global batch, only the summation order of the mean differs (float32, ~1e-7 on each
# gradient). The adapters come out of 4 AdamW steps, though, whose per-coordinate normalisation amplifies that for
# coordinates with tiny gradients (see test_fused.py::test_training_run_fused_matches_unfused), so 1e-5 of each
# tensor's largest entry (floor 1e-3 for tensors still at 0) is the measured agreement (docs/scaling.md), not a derived bound.
# The logged loss (a mean over ranks, first-order insensitive to those coordinates) is well inside it.
REL_TOL = 1e-5


DDP_METHODS = ["lora", "bilora", "lora_sam", "flat_lora"]


def _train(methods: list[str], out: Path, nproc: int) -> None:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    )
    r = subprocess.run([*launcher, str(DDP_WORKER), ",".join(methods), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Every method of DDP_METHODS, trained in one process and on two gloo ranks (two launches in all:
    one test, not one per method, so that xdist cannot split the launches over workers)."""
    from safetensors.torch import load_file

    _train(DDP_METHODS, tmp_path / "one", 1)
    _train(DDP_METHODS, tmp_path / "two", 2)
    for method in DDP_METHODS:
        single = load_file(tmp_path / "one" / method / "rank0.safetensors")
        r0, r1 = (load_file(tmp_path / "two" / method / f"rank{r}.safetensors") for r in (0, 1))
        assert set(r0) == set(r1) == set(single) and any("lora_B" in k for k in single), method
        for k in single:
            assert torch_equal(r0[k], r1[k]), f"{method} {k}: ranks disagree"  # bitwise: identical updates on every rank
            diff = (r0[k] - single[k]).abs().max().item()
            assert diff <= REL_TOL * max(single[k].abs().max().item(), 1e-3), f"{method} {k}: max |2 ranks - 1 process| = {diff:.3g}"
        h1 = json.loads((tmp_path / "one" / method / "rank0.json").read_text())
        h2 = [json.loads((tmp_path / "two" / method / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert h2[0]["world"] == 2 and h2[0]["loss"] == h2[1]["loss"], method  # logged loss = mean over ranks, same everywhere
        assert h2[0]["loss"] == pytest.approx(h1["loss"], rel=REL_TOL), method
        if method == "bilora":  # the auxiliary moved (ascent on the all-reduced gradient) and agrees too
            assert any("aux" in k and r0[k].abs().sum() > 0 for k in r0 if "lora_B" in k)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_batch_size_must_divide_by_world_size(monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import cls_examples, collate, peft_bert

    from bilora import distributed, methods
    from bilora.train import FineTuner, LoopConfig

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        FineTuner(peft_bert(), methods.build("lora"), cls_examples(8), collate, LoopConfig(batch_size=4, max_steps=1))
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        FineTuner(peft_bert(), methods.build("lora"), cls_examples(7), collate, LoopConfig(batch_size=6, max_steps=1))


def test_rank_slices_cover_the_batch(monkeypatch):
    from bilora import distributed

    for n, w in ((8, 2), (6, 3), (7, 3), (2, 2)):
        monkeypatch.setattr(distributed, "world_size", lambda w=w: w)
        parts = []
        for r in range(w):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            parts.extend(range(n)[distributed.rank_slice(n)])
        assert parts == list(range(n))


def test_launcher_runs_in_process_or_reexecs_through_torchrun(tmp_path, monkeypatch):
    import yaml

    from pipeline.config import runs
    from pipeline.config.load import validate_dict
    from pipeline.stage import layout
    from stages import launch

    args = ["--task", "sst2", "--method", "lora", "--seed", "0"]
    assert launch.launch_command("finetune", args, 1) == [sys.executable, "-m", "stages.finetune", *args]
    assert launch.launch_command("finetune", args, 2) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "stages.finetune",
        *args,
    ]
    # the process count comes from the run's settings file (configure's output, finetune's DVC dep)
    monkeypatch.chdir(tmp_path)
    assert launch.nproc_of(args) == 1  # no run file: the stage itself says what is missing
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["tasks"], raw["train"]["methods"], raw["merge"]["task"] = ["sst2"], ["lora"], "sst2"
    raw["merge"]["method"] = "lora"
    raw["train"]["distributed"] = {"nproc_per_node": 2}
    runs.write_all(validate_dict(raw), layout.RUNS)
    assert launch.nproc_of([*args, "--params", "p.yaml"]) == 2 and launch.nproc_of(["--task", "sst2"]) == 1
    dvc = (ROOT / "dvc.yaml").read_text()
    # the process count is part of each run's resolved settings file (pipeline/config/runs.py), finetune's dep
    assert "python -m stages.launch finetune --task" in dvc and "artifacts/runs/${item.task}-${item.method}-${item.seed}.json" in dvc


def test_distributed_params_are_validated():
    from pipeline.config.load import ConfigError, validate_dict

    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert validate_dict(raw).train.distributed.nproc_per_node == 1
    raw["train"]["distributed"] = {"nproc_per_node": 0, "backend": "mpi"}
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert {loc for loc, _ in e.value.problems} == {"train.distributed.nproc_per_node", "train.distributed.backend"}


@pytest.mark.slow
def test_finetune_stage_under_torchrun_two_ranks(tmp_path):
    """The real stage on the nf4 MiniLM through the launcher with 2 gloo ranks: rank 0 alone writes and tracks.

    (MiniLM trains with dropout, whose masks depend on how examples are spread over processes, so
    the stage is not compared with one process here; the exact comparison is the tiny_bert test above.)
    """
    import sqlite3

    from stagerun import tiny_params, write_params

    params = tiny_params()
    params["data"].update(train_subset=32)
    params["train"]["methods"] = ["bilora"]
    params["train"]["loop"].update(max_steps=2, batch_size=8, checkpoint_every=1)
    params["train"]["distributed"] = {"nproc_per_node": 2, "backend": "gloo"}
    params["merge"].update(method="bilora")
    wd = make_workdir(tmp_path)
    write_params(wd, params)
    for stage in ("prepare", "load_base", "configure"):
        r = run_stage(wd, stage)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run_stage(wd, "launch", "finetune", "--task", "sst2", "--method", "bilora", "--seed", "0", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = wd / "artifacts" / "finetune" / "sst2-bilora-0"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]
    assert json.loads((wd / "artifacts" / "checkpoints" / "sst2-bilora-0" / "status.json").read_text())["state"] == "complete"
    con = sqlite3.connect(wd / "mlflow.db")
    stages = [v for (v,) in con.execute("select t.value from runs r join tags t on r.run_uuid = t.run_uuid where t.key = 'dvc.stage'")]
    assert stages.count("finetune") == 1, stages  # rank 0 only
