"""Eval-only datasets (``data.eval_tasks`` + ``data.datasets.<name>.adapter_from``) and the classification
metric defaults (binary F1 for two labels, macro F1 beyond, also when the labels are inferred from train).

In-process: the schema's checks by dotted key, the format/head table, the shipped LLM-Adapters ARC-Easy
set loading as an eval-only multiple_choice dataset (test split only), DVC's own expansion of dvc.yaml
(evaluate_only@<task>-<method>-<seed>, no finetune for it), macro F1 against a hand-computed value.
Slow: the stage entry points on a tiny Llama, prepare -> finetune (a trainable task) -> evaluate on the
eval-only set with that task's adapter -> report.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from bilora import metrics as M
from pipeline.data import formats
from pipeline.data.catalog import get_task, prepared_head, prepared_task, read_splits
from pipeline.config.schema import DataConfig
from pipeline.config.load import ConfigError, validate_dict
from pipeline.data.prepare import prepare_task

ROOT = Path(__file__).resolve().parents[1]
ARC = "data/raw/llm_adapters/ARC-Easy/test.json"
ARC_DECL = {
    "format": "multiple_choice",
    "test": ARC,
    "columns": {"prompt": "instruction"},
    "choices": [f"answer{i}" for i in range(1, 6)],
    "prompt_template": "{prompt}\nAnswer:",
    "adapter_from": "boolq",
}


def problems(data: dict, **sections) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        validate_dict({"data": data, "merge": {"mode": "none"}, **sections})
    return e.value.problems


def keys(data: dict) -> list[str]:
    return [k for k, _ in problems(data)]


def test_eval_only_schema_accepts_and_lists_it():
    p = validate_dict({"data": {"tasks": ["boolq"], "eval_tasks": ["arc"], "datasets": {"arc": ARC_DECL}}, "merge": {"task": "boolq"}})
    assert p.data.evaluated == ["boolq", "arc"] and p.data.datasets["arc"].train is None
    assert validate_dict({}).data.eval_tasks == []  # default: no eval-only stage


def test_eval_only_schema_errors_name_the_dotted_key():
    cls = {"format": "classification", "test": "data/x.csv", "labels": ["a", "b", "c"], "adapter_from": "sst2"}
    got = dict(
        problems(
            {
                "tasks": ["sst2"],
                "eval_tasks": ["arc", "gsm8k", "nope", "cls"],
                "datasets": {"arc": ARC_DECL | {"adapter_from": "sst2"}, "cls": cls},
            }
        )
    )
    assert set(got) == {"data.eval_tasks.1", "data.eval_tasks.2", "data.datasets.arc.adapter_from", "data.datasets.cls.adapter_from"}
    assert "built-in" in got["data.eval_tasks.1"] and "not declared" in got["data.eval_tasks.2"]
    assert "classification head" in got["data.datasets.arc.adapter_from"] and "generation head" in got["data.datasets.arc.adapter_from"]
    assert "2 labels" in got["data.datasets.cls.adapter_from"] and "declares 3" in got["data.datasets.cls.adapter_from"]
    # the adapter's task must be trained (in data.tasks); an eval-only set may not be trained itself
    assert (
        "not in data.tasks"
        in dict(problems({"tasks": ["gsm8k"], "eval_tasks": ["arc"], "datasets": {"arc": ARC_DECL}}))["data.datasets.arc.adapter_from"]
    )
    assert keys({"tasks": ["arc"], "datasets": {"arc": ARC_DECL}}) == ["data.tasks.0"]
    assert keys({"tasks": ["boolq"], "eval_tasks": ["boolq"]}) == ["data.eval_tasks.0"]
    # a dataset with a train split is not eval-only without adapter_from, and vice versa
    mc = {k: v for k, v in ARC_DECL.items() if k != "adapter_from"}
    assert "not declared without adapter_from" not in str(
        problems({"tasks": ["boolq"], "eval_tasks": ["mc"], "datasets": {"mc": mc | {"train": ARC, "test_fraction": None}}})
    )
    assert keys({"tasks": ["boolq"], "eval_tasks": ["mc"], "datasets": {"mc": mc | {"train": ARC}}}) == ["data.eval_tasks.0"]
    assert keys({"tasks": ["boolq"], "datasets": {"mc": mc}}) == ["data.datasets.mc.train"]
    assert set(keys({"tasks": ["boolq"], "datasets": {"arc": ARC_DECL | {"train": ARC, "test": None, "test_fraction": 0.5}}})) == {
        "data.datasets.arc.train",
        "data.datasets.arc.test",
        "data.datasets.arc.test_fraction",
    }
    # eval-only classification: no train split to infer the labels from
    assert keys({"tasks": ["sst2"], "datasets": {"cls": cls | {"labels": None}}}) == ["data.datasets.cls.labels"]


def test_readme_eval_only_example_validates_and_reads(monkeypatch):
    import re

    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index("**Eval-only datasets**") :]
    raw = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    p = validate_dict({"data": raw["data"], "merge": {"task": "boolq"}})
    monkeypatch.chdir(ROOT)
    train, test, _ = read_splits(get_task("piqa", p.data), p.data)
    assert p.data.eval_tasks == ["piqa"] and train == [] and len(test) == 1838


def test_the_schema_takes_the_formats_from_the_registry():
    from typing import get_args

    ann = DataConfig.model_fields["datasets"].annotation
    dataset = get_args(ann)[1]
    assert get_args(dataset.model_fields["format"].annotation) == formats.NAMES
    assert all(f"{n} ({formats.get(n).help})" in dataset.model_fields["format"].description for n in formats.NAMES)


@pytest.fixture(scope="module")
def tok():
    from tests.test_causal_pipeline import tiny_bpe_tokenizer

    t = tiny_bpe_tokenizer(300)
    t.pad_token = t.eos_token
    return t


def test_llm_adapters_arc_easy_is_an_eval_only_multiple_choice_set(monkeypatch, tok):
    from pipeline.data.catalog import check

    monkeypatch.chdir(ROOT)
    data = DataConfig(tasks=["boolq"], eval_tasks=["arc"], datasets={"arc": ARC_DECL}, test_subset=6)
    check(data, tracked="data")  # the pre-DVC check reads eval-only sources too
    task = get_task("arc", data)
    train, test, _ = read_splits(task, data)
    assert train == [] and len(test) == 2376 and {r["answer"] for r in test} == {0, 1, 2, 3, 4}
    dd, stats = prepare_task(task, data, tok)
    assert stats["rows"] == {"train": 0, "validation": 0, "test": 6}
    assert dd["test"][0]["prompt"].endswith("answer1/answer2/answer3/answer4\nAnswer:") and dd["test"]["answer"][0] == 0


def test_shipped_commonsense_sets_load_as_eval_only_through_the_preset(monkeypatch):
    from pipeline.config import presets

    monkeypatch.chdir(ROOT)
    p = presets.load_preset("smollm2_boolq_commonsense_cpu", str(ROOT / "params.yaml"))[2]
    rows = {t: read_splits(get_task(t, p.data), p.data) for t in p.data.eval_tasks}
    assert {t: (len(tr), len(te)) for t, (tr, te, _) in rows.items()} == {  # the row counts of data/raw/llm_adapters/*/README.md
        "arc_easy": (0, 2376),
        "piqa": (0, 1838),
        "siqa": (0, 1954),
        "winogrande": (0, 1267),
        "obqa": (0, 500),
    }
    assert {r["answer"] for r in rows["siqa"][1]} == {0, 1, 2} and {r["answer"] for r in rows["winogrande"][1]} == {0, 1}


def dvc_stages(tmp_path: Path, data: dict) -> dict:
    """dvc.yaml expanded by DVC itself over a params.yaml with ``data`` merged in: stage name -> (deps, params)."""
    from dvc.repo import Repo

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(data)
    tmp_path.mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    repo = Repo.init(str(tmp_path), no_scm=True)
    try:
        out = {}
        for s in repo.index.stages:
            params = [k for d in s.deps if hasattr(d, "params") for k in d.params]
            out[s.name] = ({str(Path(d.def_path)) for d in s.deps}, params)
        return out
    finally:
        repo.close()


def test_dvc_expands_evaluate_only_for_eval_tasks(tmp_path):
    none = dvc_stages(tmp_path / "a", {"tasks": ["boolq"]})
    assert not any(n.startswith("evaluate_only") for n in none)  # the default: an empty matrix, no stage
    got = dvc_stages(tmp_path / "b", {"tasks": ["boolq"], "eval_tasks": ["arc"], "datasets": {"arc": ARC_DECL}})
    runs = {n for n in got if "@" in n}
    assert {"finetune@boolq-lora-0", "evaluate@boolq-bilora-0", "evaluate_only@arc-lora-0", "evaluate_only@arc-bilora-0"} <= runs
    assert not any("arc" in n for n in runs if not n.startswith("evaluate_only@"))  # nothing trains on it
    deps, params = got["evaluate_only@arc-lora-0"]
    assert {"artifacts/data/arc", "artifacts/finetune", "artifacts/base"} <= deps
    assert "data.datasets.arc.adapter_from" in params and "eval" in params


def test_macro_f1_hand_computed():
    preds, gold = [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 2]
    # class 0: TP 1 FP 1 FN 0 -> 2/3; class 1: TP 1 FP 1 FN 1 -> 1/2; class 2: TP 1 FP 1 FN 2 -> 2/5
    assert M.f1_macro(preds, gold) == pytest.approx((2 / 3 + 1 / 2 + 2 / 5) / 3, abs=1e-15)  # 0.52222...
    assert M.compute(("f1_macro",), ["b", "a"], ["a", "a"])["f1_macro"] == pytest.approx(
        (2 / 3 + 0) / 2
    )  # a class only predicted counts, with F1 0
    assert M.f1_macro([1, 0, 1], [1, 0, 0]) == pytest.approx((2 / 3 + 2 / 3) / 2)  # two classes: the mean of both classes' F1


def _csv(path: Path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        w.writerows(rows)
    return str(path)


def test_inferred_labels_default_metrics_follow_the_label_count(tmp_path, tok):
    from bilora.metrics import compute

    three = [("great", "5"), ("fine", "3"), ("awful", "1"), ("superb", "5"), ("ok", "3"), ("bad", "1")]
    decl = {
        "format": "classification",
        "train": _csv(tmp_path / "r3.csv", three),
        "test": _csv(tmp_path / "t3.csv", three),
        "columns": {"text": "review", "label": "stars"},
    }
    data = DataConfig(tasks=["r3"], datasets={"r3": decl}, train_subset=None, val_fraction=0.0)
    assert get_task("r3", data).metrics == ("accuracy", "f1")  # before prepare the label count is unknown
    _, stats = prepare_task(get_task("r3", data), data, tok)
    (tmp_path / "stats.json").write_text(json.dumps({"r3": stats}))
    task = prepared_task("r3", data, tmp_path)
    assert stats["meta"]["labels"] == ["1", "3", "5"] and task.num_labels == 3
    assert task.metrics == ("accuracy", "f1_macro", "mcc") and task.main_metric == "accuracy"
    assert prepared_head("r3", tmp_path) == ("classification", 3)  # what finetune reads instead of params.yaml
    # what evaluate computes with these metrics, against the hand-computed value
    assert compute(task.metrics, [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 2])["f1_macro"] == pytest.approx(0.5222222222222222)
    two = [("great", "pos"), ("awful", "neg"), ("fine", "pos"), ("bad", "neg")]
    decl2 = decl | {"train": _csv(tmp_path / "r2.csv", two), "test": _csv(tmp_path / "t2.csv", two)}
    data2 = DataConfig(tasks=["r2"], datasets={"r2": decl2}, train_subset=None, val_fraction=0.0)
    (tmp_path / "stats.json").write_text(json.dumps({"r2": prepare_task(get_task("r2", data2), data2, tok)[1]}))
    assert prepared_task("r2", data2, tmp_path).metrics == ("accuracy", "f1")  # binary: F1 of class index 1 ('pos')
    # an explicit binary f1 with more than two labels is refused: by the schema when declared, by the data check when inferred
    assert keys({"tasks": ["r3"], "datasets": {"r3": decl | {"labels": ["1", "3", "5"], "metrics": ["f1"]}}}) == [
        "data.datasets.r3.metrics"
    ]
    from pipeline.data.readers import DataError

    bad = DataConfig(tasks=["r3"], datasets={"r3": decl | {"metrics": ["accuracy", "f1"]}})
    with pytest.raises(DataError, match=r"data\.datasets\.r3\.metrics: f1 is the binary F1.*use f1_macro"):
        read_splits(get_task("r3", bad), bad)


def _mc_rows(n: int) -> str:
    base = "Please choose the correct answer to the question: {q}\n\nAnswer1: yes Answer2: no\n\nAnswer format: answer1/answer2"
    return "".join(
        json.dumps({"instruction": base.format(q=f"is {i} even?"), "input": "", "output": "", "answer": f"answer{1 + i % 2}"}) + "\n"
        for i in range(n)
    )


@pytest.mark.slow
def test_stages_train_one_task_and_evaluate_the_eval_only_set_with_its_adapter(tmp_path):
    from tests.helpers.stagerun import run_stage, write_params
    from tests.test_causal_pipeline import causal_params, tiny_llama_folder

    base = tiny_llama_folder(tmp_path / "tiny-llama")
    wd = tmp_path / "wd"
    (wd / "data" / "mine").mkdir(parents=True)
    (wd / "data" / "mine" / "mc.jsonl").write_text(_mc_rows(12))
    arc = wd / ARC
    arc.parent.mkdir(parents=True)
    shutil.copy(ROOT / ARC, arc)
    params = causal_params(base)
    mc = {
        "format": "multiple_choice",
        "train": "data/mine/mc.jsonl",
        "test_fraction": 0.25,
        "columns": {"prompt": "instruction"},
        "choices": ["answer1", "answer2"],
        "prompt_template": "{prompt}\nAnswer:",
    }
    params["data"].update(
        tasks=["mc"], eval_tasks=["arc"], datasets={"mc": mc, "arc": ARC_DECL | {"adapter_from": "mc"}}, test_subset=5, max_length=192
    )
    params["train"].update(methods=["lora"])
    params["eval"]["sharpness"]["enabled"] = False
    params["merge"].update(task="mc", method="lora", mode="none")
    write_params(wd, params)
    for stage, *args in (("prepare",), ("load_base",), ("configure",), ("finetune", "--task", "mc", "--method", "lora", "--seed", "0")):
        r = run_stage(wd, stage, *args)
        assert r.returncode == 0, f"{stage}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    stats = json.loads((wd / "artifacts" / "data" / "stats.json").read_text())
    assert stats["arc"]["rows"] == {"train": 0, "validation": 0, "test": 5}
    assert not (wd / "artifacts" / "runs" / "arc-lora-0.json").exists()  # configure: no fine-tuning run for it

    r = run_stage(wd, "evaluate", "--task", "arc", "--method", "lora", "--seed", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "adapter of finetune@mc-lora-0" in r.stdout
    m = json.loads((wd / "metrics" / "arc-lora-0.json").read_text())
    assert set(m) == {"test"} and m["test"]["n"] == 5 and 0.0 <= m["test"]["accuracy"] <= 1.0  # no train split: no gap
    preds = json.loads((wd / "artifacts" / "eval" / "arc-lora-0" / "predictions_test.json").read_text())
    assert len(preds) == 5 and set(preds) <= set(ARC_DECL["choices"])
    info = json.loads((wd / "artifacts" / "eval" / "arc-lora-0" / "run_info.json").read_text())
    assert info["tags"]["adapter.run"] == "mc-lora-0" and info["tags"]["task"] == "arc"  # the MLflow run says which adapter

    r = run_stage(wd, "evaluate", "--task", "mc", "--method", "lora", "--seed", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_stage(wd, "report")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((wd / "reports" / "summary.json").read_text())
    assert summary["arc.lora"]["adapter_from"] == "mc" and summary["arc.lora"]["main_metric"] == "accuracy"
    assert summary["arc.lora"]["median_step_time"] == summary["mc.lora"]["median_step_time"]  # the adapter's training
    assert "adapter_from" not in summary["mc.lora"]
    md = (wd / "reports" / "report.md").read_text()
    assert "| arc (adapter of mc) | lora | 1 | accuracy" in md and "eval-only arc with the adapters of mc" in md
    assert "arc.lora" in r.stdout and "adapter of mc" in r.stdout
    assert sorted(p.name for p in (wd / "reports" / "history").iterdir()) == ["mc-lora-0.json"]  # eval-only rows trained nothing
