"""The report: its helpers, and its outputs byte for byte on fixed inputs (the full stage runs in test_pipeline)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.config.load import load_params
from pipeline.report.collect import collect, mean_std
from pipeline.report.precision import rounded
from pipeline.report.tables import headline_metrics, split_note
from pipeline.report.write import write_report
from tests.helpers.report_fixture import CASES, write_inputs

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = json.loads((ROOT / "tests" / "data" / "report_digests.json").read_text())


def test_split_note_names_each_test_file_and_glue_anchors_only_for_glue():
    gsm = split_note(["gsm8k"], 20)
    assert "first 20 rows" in gsm and "gsm8k/test.jsonl" in gsm
    assert "GLUE" not in gsm and "T5" not in gsm  # no GLUE wording or T5 anchors on a GSM8K report
    glue = split_note(["sst2", "mrpc"], None)
    assert "glue/SST-2/dev.tsv" in glue and "glue/MRPC/dev.tsv" in glue and "use dev" in glue and "T5-base" in glue
    assert "first" not in glue


def test_mean_std_is_sample_std():
    mean, std = mean_std([1.0, 2.0, 4.0])
    # statistics.stdev against the float64 hand formula (inexact mean 7/3, three squares, a sqrt): a few roundings,
    # 1 ulp apart (2.2e-16 at 1.53, observed); 1e-15 ≈ 4.5 ulp, and a population std (1.25) would be far outside
    assert mean == 7 / 3 and abs(std - (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) ** 0.5) < 1e-15
    assert mean_std([0.5]) == (0.5, 0.0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_writes_the_same_bytes_as_before_the_split(case, tmp_path, monkeypatch):
    # tests/data/report_digests.json: sha256 of every file the single-file stages/report.py (before the
    # collect/tables/plots split) wrote for these inputs; matplotlib is pinned, so the PNGs are reproducible
    params = load_params(write_inputs(tmp_path, case, ROOT))
    monkeypatch.chdir(tmp_path)
    written = write_report(params, Path("reports"))
    got = {
        str(f.relative_to("reports")): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path("reports").rglob("*")) if f.is_file()
    }
    assert set(written.files) <= set(got)
    got.pop("metrics.json")  # the headline file came after the split (test_headline_metrics_file)
    got.pop("perturbation.png")  # so did the diagnostics figure (test_perturbation_figure_...)
    assert got == DIGESTS[case]
    assert json.loads(Path("reports/metrics.json").read_text()) == rounded(headline_metrics(params, collect(params)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_headline_metrics_file(case, tmp_path, monkeypatch):
    # reports/metrics.json, the one dvc.yaml `metrics:` file: per run the main test metric and the full-space
    # random sharpness at the largest radius, both as metrics/<run>.json records them; nothing else (no timings)
    params = load_params(write_inputs(tmp_path, case, ROOT))
    monkeypatch.chdir(tmp_path)
    got = headline_metrics(params, collect(params))
    want = {}
    for task in params.data.tasks:
        main = "accuracy"  # sst2 and mrpc
        for method in params.train.methods:
            for seed in params.train.seeds:
                name = f"{task}-{method}-{seed}"
                m = json.loads(Path(f"metrics/{name}.json").read_text())
                want[name] = {"test": m["test"][main]} | ({"sharp": m["sharpness"]["full.random.r0.05.mean"]} if "sharpness" in m else {})
    assert got == want
    assert all(set(row) <= {"test", "sharp"} for row in got.values())
    assert CASES[case]["sharpness"] == all("sharp" in row for row in got.values())


def test_collect_reads_the_headline_from_sharpness_json(tmp_path, monkeypatch):
    # the metrics/ sharpness keys and the typed sharpness.json agree: collect uses the latter, never parses keys
    params = load_params(write_inputs(tmp_path, "sharp", ROOT))
    monkeypatch.chdir(tmp_path)
    data = collect(params)
    g = data.groups[("sst2", "bilora")]
    flat = [json.loads(Path(f"metrics/sst2-bilora-{s}.json").read_text())["sharpness"] for s in params.train.seeds]
    assert g.headline("random", "full") == [m["full.random.r0.05.mean"] for m in flat]  # largest radius, not the last one
    assert g.headline("attack", "lora", "accuracy") == [m["lora.attack.a2.5.accuracy"] for m in flat]
    assert data.groups[("mrpc", "lora")].headline("attack", "full", "accuracy") is None  # no metric evaluated there


def test_perturbation_figure_is_drawn_and_linked_only_when_a_run_measured_one(tmp_path, monkeypatch):
    params = load_params(write_inputs(tmp_path, "sharp", ROOT))
    monkeypatch.chdir(tmp_path)
    written = write_report(params, Path("reports"))
    assert "perturbation.png" not in Path("reports/report.md").read_text() and "perturbation.png" not in written.files
    assert Path("reports/perturbation.png").is_file()  # the declared DVC out is still written: a placeholder saying why

    hist_file = Path("artifacts/finetune/mrpc-bilora-0/history.json")
    hist = json.loads(hist_file.read_text())
    for h in hist[4::5]:
        h |= {"perturbation.loss_increase": 0.01, "perturbation.relative_increase": 0.0123456, "perturbation.alignment": 0.4}
    hist_file.write_text(json.dumps(hist))
    written = write_report(params, Path("reports"))
    assert "![perturbation diagnostics](perturbation.png)" in Path("reports/report.md").read_text()
    assert "perturbation.png" in written.files
    from pipeline.report.charts import _series

    steps, pct = _series(collect(params).histories, "mrpc-bilora-0", "perturbation.relative_increase", 100)
    assert steps == [h["step"] for h in hist[4::5]] and set(pct) == {1.23}  # percent, 3 significant digits
    assert "perturbation" not in json.dumps(headline_metrics(params, collect(params)))  # a plain figure, not a DVC metric
