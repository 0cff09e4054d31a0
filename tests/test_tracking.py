"""pipeline.tracking.tracker against a real sqlite store: experiment kind, dataset inputs, system metrics, outage."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.tracking import tracker
from pipeline.tracking.experiment import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, tracking_uri
from pipeline.tracking.tracker import Tracker, split_digest


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield uri
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_new_experiment_is_a_training_experiment(store):
    with Tracker("probe", "kind-new", {"a": 1}) as t:
        pass
    assert t.info()["tracked"]
    exp = client(store).get_experiment_by_name("kind-new")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_existing_untagged_experiment_is_tagged_on_the_next_run_explicit_choice_kept(store):
    c = client(store)
    old = c.create_experiment("kind-old")
    assert EXPERIMENT_KIND_TAG not in c.get_experiment(old).tags
    with Tracker("probe", "kind-old", {"a": 1}):
        pass
    assert c.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = c.create_experiment("kind-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    with Tracker("probe", "kind-chosen", {"a": 1}):
        pass
    assert c.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_split_digest_is_a_content_hash(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, payload in ((a, b"rows"), (b, b"rows")):
        d.mkdir()
        (d / "data-00000-of-00001.arrow").write_bytes(payload)
        (d / "state.json").write_text(json.dumps({"_fingerprint": str(d)}))  # not part of the digest
    assert split_digest(a) == split_digest(b) and len(split_digest(a)) == 16
    (b / "data-00000-of-00001.arrow").write_bytes(b"other rows")
    assert split_digest(a) != split_digest(b)


def test_datasets_are_run_inputs_with_name_digest_source_rows(store):
    with Tracker("probe", "data", {"a": 1}) as t:
        t.log_dataset("sst2/train", "0123456789abcdef", "artifacts/data/sst2/train", 120, "training")
        t.log_dataset("sst2/validation", "fedcba9876543210", "artifacts/data/sst2/validation", 30, "validation")
    inputs = client(store).get_run(t.run_id).inputs.dataset_inputs
    got = {i.dataset.name: i for i in inputs}
    assert set(got) == {"sst2/train", "sst2/validation"}
    tr = got["sst2/train"]
    assert tr.dataset.digest == "0123456789abcdef"
    assert tr.dataset.source_type == "local"
    assert json.loads(tr.dataset.source) == {"uri": "artifacts/data/sst2/train"}
    assert json.loads(tr.dataset.profile) == {"num_rows": 120}
    assert {x.key: x.value for x in tr.tags}["mlflow.data.context"] == "training"
    assert {x.key: x.value for x in got["sst2/validation"].tags}["mlflow.data.context"] == "validation"
    assert json.loads(got["sst2/validation"].dataset.profile) == {"num_rows": 30}


def test_system_metrics_are_logged_when_on_and_the_sampler_stops(store, monkeypatch):
    import threading

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    with Tracker("finetune", "sys", {"a": 1}, system_metrics=True) as t:
        time.sleep(2.5)
    keys = set(client(store).get_run(t.run_id).data.metrics)
    assert any(k.startswith("system/cpu_utilization") for k in keys), keys
    assert any(k.startswith("system/system_memory_usage") for k in keys), keys
    time.sleep(1.5)
    assert not [th for th in threading.enumerate() if th.name == "SystemMetricsMonitor" and th.is_alive()]
    with Tracker("evaluate", "sys", {"a": 1}) as off:
        pass
    assert not [k for k in client(store).get_run(off.run_id).data.metrics if k.startswith("system/")]


def test_tracking_down_everything_still_completes(tmp_path, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    warnings: list[str] = []
    monkeypatch.setattr(tracker, "warn", warnings.append)
    start = time.monotonic()
    with Tracker("finetune", "down", {"a": 1}, system_metrics=True) as t:
        t.log_dataset("sst2/train", "0123456789abcdef", "artifacts/data/sst2/train", 120, "training")
        t.log_metrics({"m": 1.0}, step=1)
    assert time.monotonic() - start < 60
    assert t.info()["tracked"] is False
    assert len(warnings) == 1 and "continuing without tracking" in warnings[0]

    # the parent run (pipeline.run / dvc exp run) is optional too: no parent, one warning each, the stage goes on
    from pipeline.tracking import parent

    monkeypatch.setattr(parent, "warn", warnings.append)
    assert parent.open_parent(tracking_uri(), "down", "p", {}) is None
    monkeypatch.setenv("DVC_EXP_NAME", "some-exp")
    with Tracker("finetune", "down", {"a": 1}) as t:
        pass
    assert parent.exp_parent(tracking_uri(), "down", "some-exp") is None
    parent.close_parent(tracking_uri(), "0" * 32)
    assert t.info()["tracked"] is False and t.info()["parent_run_id"] is None
    assert len(warnings) == 5 and sum("parent run" in w for w in warnings) == 3
    assert time.monotonic() - start < 120


def test_sampler_is_stopped_when_end_run_fails(store, monkeypatch):
    import threading

    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
    warnings: list[str] = []
    monkeypatch.setattr(tracker, "warn", warnings.append)
    t = Tracker("finetune", "sys-fail", {"a": 1}, system_metrics=True)
    assert [th for th in threading.enumerate() if th.name == "SystemMetricsMonitor"]

    def boom(*a, **k):
        raise ConnectionError("server went away")

    with monkeypatch.context() as m:
        m.setattr(mlflow, "end_run", boom)
        t.end()
    assert len(warnings) == 1
    deadline = time.monotonic() + 10
    while [th for th in threading.enumerate() if th.name == "SystemMetricsMonitor" and th.is_alive()] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [th for th in threading.enumerate() if th.name == "SystemMetricsMonitor" and th.is_alive()]


def test_log_split_names_digests_and_sources_a_prepared_split(store, tmp_path):
    data = tmp_path / "artifacts" / "data"
    (data / "sst2" / "train").mkdir(parents=True)
    (data / "sst2" / "train" / "data-00000-of-00001.arrow").write_bytes(b"arrow bytes")
    with Tracker("evaluate", "split", {"a": 1}) as t:
        t.log_split(data, "sst2", "train", 7, "training")
        t.log_split(data, "sst2", "train", 3, "evaluation", first=3)
    got = {i.dataset.name: i.dataset for i in client(store).get_run(t.run_id).inputs.dataset_inputs}
    assert set(got) == {"sst2/train", "sst2/train[:3]"}
    full, sub = got["sst2/train"], got["sst2/train[:3]"]
    assert full.digest == split_digest(data / "sst2" / "train") and sub.digest != full.digest
    assert json.loads(full.source) == json.loads(sub.source) == {"uri": "artifacts/data/sst2/train"}
    assert json.loads(full.profile) == {"num_rows": 7} and json.loads(sub.profile) == {"num_rows": 3}


def test_prediction_sample_is_logged_as_a_table(store):
    from pipeline.stage.scoring import prediction_table

    rows = [{"generation": "so 4", "prediction": "4", "gold": "4"}, {"generation": "x", "prediction": None, "gold": "2"}]
    with Tracker("probe", "tables", {"a": 1}) as t:
        t.log_table(prediction_table(rows), "predictions_test_sample.json")
    path = client(store).download_artifacts(t.run_id, "predictions_test_sample.json", str(store.split("///")[1].rsplit("/", 1)[0]))
    table = json.loads(open(path).read())
    assert table["columns"] == ["generation", "prediction", "gold"]
    assert table["data"] == [["so 4", "4", "4"], ["x", "None", "2"]]
    assert prediction_table([1, 0]) == {"index": [0, 1], "prediction": ["1", "0"]}


@pytest.mark.slow
def test_stage_runs_log_their_own_params_through_the_real_stages(tmp_path):
    """finetune's MLflow params are its run config (its method's settings only, a variant's overrides);
    comparing a LoRA and a Bi-LoRA run lists the Bi-LoRA settings as the differing params; evaluate and
    merge log what they used and which adapter."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
    from stagerun import make_workdir, run_stage, tiny_params

    params = tiny_params()
    params["train"]["methods"] = ["lora", "bilora", "bilora_rho0.5"]
    params["train"]["variants"] = {"bilora_rho0.5": {"method": "bilora", "rho": 0.5}}
    params["train"]["loop"].update(max_steps=1, checkpoint_every=0)
    params["eval"]["sharpness"]["enabled"] = False
    params["eval"]["train_subset"] = 0
    params["merge"].update(method="bilora_rho0.5")
    wd = make_workdir(tmp_path, params)
    stages = [("prepare",), ("load_base",), ("configure",)]
    stages += [("finetune", "--task", "sst2", "--method", m, "--seed", "0") for m in params["train"]["methods"]]
    stages += [("evaluate", "--task", "sst2", "--method", "bilora_rho0.5", "--seed", "0"), ("merge",)]
    for stage in stages:
        r = run_stage(wd, *stage, timeout=600)
        assert r.returncode == 0, f"{stage}: {r.stdout[-2000:]}{r.stderr[-3000:]}"

    c = client(f"sqlite:///{wd / 'mlflow.db'}")
    exp = c.get_experiment_by_name(params["tracking"]["experiment"])
    by_name = {r.info.run_name: r.data.params for r in c.search_runs([exp.experiment_id])}
    lora, bilora, variant = (by_name[f"finetune@sst2-{m}-0"] for m in params["train"]["methods"])
    bilora_keys = {"bilora.rho", "bilora.aux_rank", "bilora.aux_alpha", "bilora.aux_lr", "bilora.fused"}
    assert {k for k in lora.keys() | bilora.keys() if lora.get(k) != bilora.get(k)} == {"method", "method_key"} | bilora_keys
    assert {"method": "lora", "lora.r": "8", "loop.lr": "0.001", "loop.max_steps": "1", "task": "sst2", "seed": "0"}.items() <= lora.items()
    assert not [k for k in lora if k.startswith(("train.", "data.", "base.", "bilora.", "lora_sam.", "flat_lora."))]
    assert {"method": "bilora", "bilora.rho": "0.05"}.items() <= bilora.items()
    assert {"method": "bilora_rho0.5", "method_key": "bilora", "bilora.rho": "0.5"}.items() <= variant.items()
    assert {k for k in variant.keys() | bilora.keys() if variant.get(k) != bilora.get(k)} == {"method", "bilora.rho"}
    info = json.loads((wd / "artifacts" / "finetune" / "sst2-bilora_rho0.5-0" / "run_info.json").read_text())
    assert info["tracked"] and "adapter" in info["models"]  # a variant's '.' is no MLflow model name: adapter-sst2-bilora_rho0_5-0

    ev = by_name["evaluate@sst2-bilora_rho0.5-0"]
    assert {"adapter.run": "sst2-bilora_rho0.5-0", "eval.batch_size": "64", "eval.sharpness.enabled": "False"}.items() <= ev.items()
    assert not [k for k in ev if k.startswith(("train.", "eval.sharpness.radii", "eval.max_new_tokens"))]  # unused here
    merge = by_name["merge@sst2-bilora_rho0.5-0"]
    assert {"adapter.run": "sst2-bilora_rho0.5-0", "merge.mode": "nf4_roundtrip", "merge.method": "bilora_rho0.5"}.items() <= merge.items()
    print(json.dumps({n: by_name[n] for n in sorted(by_name) if n.startswith(("finetune", "evaluate", "merge"))}, indent=1, sort_keys=True))
