"""Bad user data: one clear message naming the file, line (Parquet: row) and column; nothing written.

In-process through ``pipeline.data.catalog.check`` (what ``python -m pipeline.run`` calls before ``dvc repro``),
and three cases through the README's run command itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data.catalog import check
from pipeline.config.load import ConfigError, load_params
from pipeline.config.schema import DataConfig
from pipeline.data.readers import DataError

ROOT = Path(__file__).resolve().parents[1]

GOOD = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}, {"prompt": "p3", "completion": "c3"}]


def jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def cfg(**decl) -> DataConfig:
    decl.setdefault("test_fraction", 0.34)
    return DataConfig(tasks=["mine"], datasets={"mine": decl}, train_subset=None)


def fails(data: DataConfig, *needles: str) -> str:
    with pytest.raises(DataError) as e:
        check(data)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_malformed_json_line(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [GOOD[0], '{"prompt": "p2", "completion": ', GOOD[2]])
    fails(cfg(format="prompt_completion", train=f), f"{f}:2: malformed JSON")


def test_missing_column_lists_found_columns(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", GOOD[:1] + [{"prompt": "p", "answer": "a"}])
    fails(cfg(format="prompt_completion", train=f), f"{f}:2:", "'completion'", "columns found: ['answer', 'prompt']", "columns.completion")


def test_label_outside_declared_set(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\ngood,pos\nbad,neg\nmeh,neutral\n", encoding="utf-8")
    fails(
        cfg(format="classification", train=str(tmp_path / "d.csv"), labels=["neg", "pos"]),
        f"{tmp_path / 'd.csv'}:4:",
        "'label'",
        "'neutral'",
        "['neg', 'pos']",
    )


def test_test_label_not_seen_in_train(tmp_path):
    tr = tmp_path / "tr.csv"
    tr.write_text("text,label\ngood,pos\nbad,neg\n", encoding="utf-8")
    te = tmp_path / "te.csv"
    te.write_text("text,label\nok,neutral\n", encoding="utf-8")
    fails(DataConfig(tasks=["m"], datasets={"m": {"format": "classification", "train": str(tr), "test": str(te)}}), f"{te}:2:", "'neutral'")


@pytest.mark.parametrize("value, word", [("   ", "is empty"), (5, "must be a string")])
def test_empty_or_non_string_text(tmp_path, value, word):
    f = jsonl(tmp_path / "d.jsonl", GOOD[:2] + [{"prompt": value, "completion": "c"}])
    fails(cfg(format="prompt_completion", train=f), f"{f}:3:", "'prompt'", word)


CHAT = {"format": "chat", "columns": {"messages": "conversations", "role": "from", "content": "value"}}


@pytest.mark.parametrize(
    "conv, needles",
    [
        ([{"from": "human", "value": "hi"}], ("no assistant turn",)),
        ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], ("roles out of order at message 0", "expected 'user'")),
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
            ("roles out of order at message 1",),
        ),
        ([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], ("unknown role 'robot'", "role_map")),
    ],
)
def test_bad_chats(tmp_path, conv, needles):
    ok = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    f = jsonl(tmp_path / "c.jsonl", [ok, {"conversations": conv}, ok])
    fails(cfg(train=f, **CHAT), f"{f}:2:", *needles)


def test_empty_file(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [])
    fails(cfg(format="prompt_completion", train=f), f, "no records")


def test_empty_after_explode(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "instances": []}])
    fails(cfg(format="alpaca", train=f, explode="instances", columns={"output": "instances.output"}), f, "no records")


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    fails(cfg(format="prompt_completion", train=str(tmp_path / "d.xlsx")), "unsupported extension '.xlsx'", "type:")


def test_parquet_that_does_not_parse(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    fails(cfg(format="prompt_completion", train=str(tmp_path / "d.parquet")), f"{tmp_path / 'd.parquet'}: not a readable Parquet file")


def test_parquet_bad_row_named_by_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GOOD[:2] + [{"prompt": "", "completion": "c"}]), tmp_path / "d.parquet")
    fails(cfg(format="prompt_completion", train=str(tmp_path / "d.parquet")), f"{tmp_path / 'd.parquet'} row 2:", "'prompt'", "is empty")


def test_csv_that_does_not_parse(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\np1,c1\n"p2 unclosed,c2\n', encoding="utf-8")
    fails(cfg(format="prompt_completion", train=str(tmp_path / "d.csv")), f"{tmp_path / 'd.csv'}:", "not valid CSV")


def test_csv_wrong_column_count(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\np1,c1\np2,c2,extra\n", encoding="utf-8")
    fails(cfg(format="prompt_completion", train=str(tmp_path / "d.csv")), f"{tmp_path / 'd.csv'}:3:", "expected 2 columns")


@pytest.mark.parametrize("frac, empty", [(0.01, "test"), (0.99, "train")])
def test_split_fraction_leaves_a_split_empty(tmp_path, frac, empty):
    f = jsonl(tmp_path / "d.jsonl", GOOD)
    fails(cfg(format="prompt_completion", train=f, test_fraction=frac), "test_fraction", f"leaves the {empty} split empty")


def test_missing_file(tmp_path):
    fails(cfg(format="prompt_completion", train=str(tmp_path / "nope.jsonl")), "nope.jsonl: file not found")


def test_hub_source_offline_names_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(
        cfg(format="alpaca", train="hf:tatsu-lab/alpaca"),
        "hf:tatsu-lab/alpaca",
        "HF_HUB_OFFLINE=1",
        "HF_HUB_OFFLINE=0 python -m pipeline.run",
    )


def test_multiple_choice_answer_not_a_choice(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "answer1"}, {"prompt": "q", "answer": "answer9"}])
    fails(cfg(format="multiple_choice", train=f, choices=["answer1", "answer2"]), f"{f}:2:", "'answer9'", "not one of the choices")


def _config_problems(raw: dict) -> str:
    from pipeline.config.load import validate_dict

    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    return str(e.value)


def test_schema_errors_listed_by_path():
    msg = _config_problems(
        {
            "data": {
                "tasks": ["mine"],
                "datasets": {
                    "mine": {"format": "alpaca", "train": "x.jsonl", "extraction": "regex"},
                    "other": {"format": "chat", "train": {"path": "a", "hf": "b"}, "test_fraction": 0.1},
                },
            },
            "merge": {"mode": "none"},
        }
    )
    for n in (
        "data.datasets.mine.test: give a test source or test_fraction",
        "data.datasets.mine.regex: extraction: regex needs",
        "data.datasets.other.train.path: give exactly one of path",
    ):
        assert n in msg, msg
    # names (checked once every dataset entry is valid)
    msg = _config_problems(
        {
            "data": {"tasks": ["mine", "nope"], "datasets": {"sst2": {"format": "alpaca", "train": "y", "test_fraction": 0.1}}},
            "merge": {"mode": "none"},
        }
    )
    assert "data.datasets.sst2: 'sst2' is a built-in task" in msg and "data.tasks: unknown task(s) ['mine', 'nope']" in msg, msg


# ------------------------------------------------------------------------------------------
# Through the README's run command: exit 2, one message, no traceback, nothing written
# ------------------------------------------------------------------------------------------


def _run(tmp_path: Path, decl: dict) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["tasks"] = ["mine"]
    params["data"]["datasets"] = {"mine": decl}
    params["merge"]["task"] = "mine"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / ".dvc").mkdir()  # looks like a DVC repo: only the data check can stop the run
    load_params(tmp_path / "params.yaml")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "pipeline.run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr + r.stdout
    return r


def test_run_command_malformed_json(tmp_path):
    (tmp_path / "data").mkdir()
    jsonl(tmp_path / "data" / "d.jsonl", [GOOD[0], "{oops", GOOD[1]])
    r = _run(tmp_path, {"format": "prompt_completion", "train": "data/d.jsonl", "test_fraction": 0.34})
    assert "data/d.jsonl:2: malformed JSON" in " ".join((r.stdout + r.stderr).split())


def test_run_command_missing_column(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "r.csv").write_text("review,stars\ngood,5\nbad,1\nok,3\n", encoding="utf-8")
    r = _run(tmp_path, {"format": "classification", "train": "data/r.csv", "test_fraction": 0.34, "columns": {"text": "review"}})
    out = " ".join((r.stdout + r.stderr).split())
    assert re.search(r"data/r\.csv:[234]: column 'label'", out) and "'label'" in out and "columns found: ['review', 'stars']" in out


def test_run_command_hub_offline(tmp_path):
    r = _run(tmp_path, {"format": "alpaca", "train": "hf:tatsu-lab/alpaca", "test_fraction": 0.1})
    assert "HF_HUB_OFFLINE" in r.stdout + r.stderr
