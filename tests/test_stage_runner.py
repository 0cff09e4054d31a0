"""pipeline/stage/runner.py: the common arguments, the tracker's disabled mode (ranks other than 0) and the
atomic output folder closed by run_info.json."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.stage.runner import Stage
from pipeline.tracking.tracker import Tracker

ROOT = Path(__file__).resolve().parents[1]


def test_disabled_tracker_starts_no_run(monkeypatch):
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    t = Tracker("finetune", "exp", {"a": 1}, tags={"task": "sst2"}, enabled=False)
    with t:
        t.log_metrics({"loss": 1.0})
        t.log_split("nowhere", "sst2", "train", 3, "training")
        t.set_tags({"x": 1})
    assert "mlflow" not in sys.modules and t.run_id is None
    assert t.info()["tracked"] is False and t.info()["tags"]["task"] == "sst2"


def test_stage_parses_run_args_and_writes_run_info(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    stage = Stage("evaluate", "doc", ["--task", "sst2", "--method", "lora", "--seed", "3"], per_run=True)
    assert stage.run == "sst2-lora-3" and stage.run_tags == {"task": "sst2", "method": "lora", "seed": 3}
    assert stage.params.tracking.experiment
    stage.track({"eval": {"batch_size": 8}}, tags=stage.run_tags, enabled=False)
    with stage.output(tmp_path / "out", kernel={"k": "v"}) as tmp:
        (tmp / "metrics.json").write_text("{}")
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["kernel"] == {"k": "v"} and info["tracked"] is False and (tmp_path / "out" / "metrics.json").exists()
    with pytest.raises(RuntimeError), stage.output(tmp_path / "out2") as tmp:
        raise RuntimeError("stage failed")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(SystemExit):
        Stage("evaluate", "doc", ["--task", "sst2"], per_run=True)
