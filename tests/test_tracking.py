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
