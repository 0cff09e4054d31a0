"""The "Fine-tune on your own data" example (docs/data.md) validates, and the datasets it names that ship
with the repo pass the data check; the LLM-Adapters commonsense files load through multiple_choice."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.data.catalog import check, get_task, read_splits
from pipeline.config.schema import DataConfig
from pipeline.config.load import validate_dict

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> dict:
    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index("## Fine-tune on your own data") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)


def test_readme_example_validates_every_format(monkeypatch):
    raw = readme_example()
    names = list(raw["data"]["datasets"])
    p = validate_dict({"data": raw["data"] | {"tasks": names}, "merge": {"mode": "none"}})
    assert {d.format for d in p.data.datasets.values()} == {
        "classification",
        "regression",
        "alpaca",
        "prompt_completion",
        "chat",
        "multiple_choice",
    }
    monkeypatch.chdir(ROOT)
    shipped = [n for n, d in p.data.datasets.items() if all((ROOT / s.path).exists() for s in (d.train, d.test) if s is not None)]
    assert set(shipped) >= {"reviews", "code_alpaca", "self_instruct"}
    check(p.data.model_copy(update={"tasks": shipped}), tracked="data")


def test_self_instruct_nested_instances(monkeypatch):
    monkeypatch.chdir(ROOT)
    d = readme_example()["data"]["datasets"]["self_instruct"]
    data = DataConfig(tasks=["self_instruct"], datasets={"self_instruct": d})
    train, test, _ = read_splits(get_task("self_instruct", data), data)
    assert len(train) + len(test) == 175  # 175 seed tasks, one instance each: exploded, one example per instance
    assert all(r["output"].strip() for r in train + test)


def test_llm_adapters_arc_easy_loads_as_multiple_choice(monkeypatch):
    monkeypatch.chdir(ROOT)
    data = DataConfig(
        tasks=["arc"],
        datasets={
            "arc": {
                "format": "multiple_choice",
                "train": "data/raw/llm_adapters/ARC-Easy/test.json",
                "test_fraction": 0.5,
                "columns": {"prompt": "instruction"},
                "choices": ["answer1", "answer2", "answer3", "answer4", "answer5"],
                "prompt_template": "{prompt}\nAnswer:",
            }
        },
    )
    train, test, _ = read_splits(get_task("arc", data), data)
    assert len(train) + len(test) == 2376
    assert {r["answer"] for r in train + test} == {0, 1, 2, 3, 4}
    assert all("Answer1:" in r["prompt"] for r in train[:50])
