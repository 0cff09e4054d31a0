"""pipeline.data.builtin: the real raw files read with the right counts, and every bad-input case as a DataError
that names the file and the line."""

from __future__ import annotations

import collections
import functools
import json
import re
import shutil
from pathlib import Path

import pytest

from bilora import metrics
from pipeline.data.builtin import BOOLQ_PREFIX, BOOLQ_SUFFIX, TASKS
from pipeline.data.readers import DataError
from pipeline.data.task import TaskSpec
from pipeline.data.catalog import get_task

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"


@functools.lru_cache(maxsize=None)
def _read(task: str, split: str) -> list[dict]:
    return get_task(task).read(RAW, split)


# --------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------


def test_registry():
    assert set(TASKS) == {"mrpc", "rte", "cola", "sst2", "stsb", "gsm8k", "boolq"}
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.kind in ("classification", "regression", "generation")
        assert spec.num_labels == {"classification": 2, "regression": 1, "generation": 0}[spec.kind]
        assert spec.main_metric in spec.metrics
        assert set(spec.metrics) <= set(metrics.METRICS), spec.metrics
        for f in (spec.train_file, spec.test_file, spec.licence_file):
            assert (RAW / f).is_file(), f
    assert TASKS["mrpc"].metrics == ("accuracy", "f1") and TASKS["mrpc"].main_metric == "accuracy"
    assert TASKS["cola"].main_metric == "mcc"
    assert TASKS["stsb"].metrics == ("pearson", "spearman") and TASKS["stsb"].main_metric == "pearson"
    assert TASKS["gsm8k"].main_metric == "exact_match"
    assert TASKS["boolq"].main_metric == "accuracy"
    assert TASKS["rte"].test_file == "glue/RTE/dev.tsv"


def test_get_task_unknown_lists_names():
    assert get_task("cola") is TASKS["cola"]
    with pytest.raises(KeyError, match="mrpc.*rte|known tasks: boolq, cola, gsm8k, mrpc, rte, sst2, stsb"):
        get_task("mnli")


def test_unknown_split():
    with pytest.raises(ValueError, match="dev"):
        get_task("rte").read(RAW, "dev")


def test_spec_is_frozen():
    with pytest.raises(Exception):
        TASKS["rte"].name = "x"  # type: ignore[misc]
    assert isinstance(TASKS["rte"], TaskSpec)


# --------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------

COUNTS = {
    ("mrpc", "train"): 3668, ("mrpc", "test"): 408,
    ("rte", "train"): 2490, ("rte", "test"): 277,
    ("cola", "train"): 8551, ("cola", "test"): 1043,
    ("sst2", "train"): 67349, ("sst2", "test"): 872,
    ("stsb", "train"): 5749, ("stsb", "test"): 1500,
    ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319,
    ("boolq", "train"): 9427, ("boolq", "test"): 3270,
}  # fmt: skip

# label counts from the data READMEs (rte: 0 = entailment, 1 = not_entailment; boolq: true / false)
LABELS = {
    ("mrpc", "train"): {1: 2474, 0: 1194}, ("mrpc", "test"): {1: 279, 0: 129},
    ("rte", "train"): {0: 1249, 1: 1241}, ("rte", "test"): {0: 146, 1: 131},
    ("cola", "train"): {1: 6023, 0: 2528}, ("cola", "test"): {1: 721, 0: 322},
    ("sst2", "train"): {1: 37569, 0: 29780}, ("sst2", "test"): {1: 444, 0: 428},
    ("boolq", "train"): {"true": 5874, "false": 3553}, ("boolq", "test"): {"true": 2033, "false": 1237},
}  # fmt: skip


@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_real_counts(task, split):
    rows = _read(task, split)
    assert len(rows) == COUNTS[task, split]
    spec = get_task(task)
    if spec.kind == "generation":
        for r in rows:
            assert set(r) == {"question", "answer"}
            assert isinstance(r["question"], str) and r["question"].strip()
        return
    for r in rows:
        assert set(r) == {"text_a", "text_b", "label"}
        assert isinstance(r["text_a"], str) and r["text_a"].strip()
        if task in ("cola", "sst2"):
            assert r["text_b"] is None
        else:
            assert isinstance(r["text_b"], str) and r["text_b"].strip()


@pytest.mark.parametrize("task,split", sorted(LABELS))
def test_real_label_counts(task, split):
    key = "answer" if task == "boolq" else "label"
    got = collections.Counter(r[key] for r in _read(task, split))
    assert dict(got) == LABELS[task, split]
    if task != "boolq":
        assert all(type(r["label"]) is int for r in _read(task, split))


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_stsb_scores(split):
    scores = [r["label"] for r in _read("stsb", split)]
    assert all(type(s) is float and 0.0 <= s <= 5.0 for s in scores)
    assert min(scores) == 0.0 and max(scores) == 5.0


def test_real_first_rows():
    mrpc = _read("mrpc", "train")[0]
    assert mrpc["label"] == 1 and mrpc["text_a"].startswith("Amrozi accused his brother")  # BOM not in the header
    cola = _read("cola", "train")[0]
    assert cola == {"text_a": "Our friends won't buy this analysis, let alone the next one we propose.", "text_b": None, "label": 1}
    assert _read("cola", "test")[-1]["text_a"].endswith("himself.")  # dev.tsv has no trailing newline
    assert _read("rte", "train")[0]["label"] == 1  # not_entailment
    assert _read("stsb", "train")[0] == {"text_a": "A plane is taking off.", "text_b": "An air plane is taking off.", "label": 5.0}
    assert _read("sst2", "train")[0] == {"text_a": "hide new secretions from the parental units ", "text_b": None, "label": 0}


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_gsm8k_answers(split):
    for r in _read("gsm8k", split):
        assert re.search(r"^#### \S", r["answer"].split("\n")[-1])


def test_real_boolq_question():
    first = _read("boolq", "train")[0]
    assert first == {"question": "do iran and afghanistan speak the same language?", "answer": "true"}
    raw = json.loads((RAW / "boolq/train.json").read_text())[0]
    assert raw["instruction"] == BOOLQ_PREFIX + first["question"] + BOOLQ_SUFFIX


# --------------------------------------------------------------------------------------
# Bad inputs (tmp_path copies of the real files)
# --------------------------------------------------------------------------------------


def _copy(tmp_path: Path, task: str, split: str = "train") -> Path:
    """Copy one real file into a raw dir under tmp_path; return the copy's path."""
    spec = get_task(task)
    rel = spec.train_file if split == "train" else spec.test_file
    dst = tmp_path / "raw" / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RAW / rel, dst)
    return dst


def _edit_line(path: Path, lineno: int, fn) -> None:
    """Apply fn to 1-based line `lineno` (bytes, without its newline)."""
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = fn(lines[lineno - 1])
    path.write_bytes(b"\n".join(lines))


def _expect(tmp_path: Path, task: str, split: str, path: Path, line: int | None, *words: str) -> str:
    with pytest.raises(DataError) as ei:
        get_task(task).read(tmp_path / "raw", split)
    msg = str(ei.value)
    prefix = f"{path}:{line}:" if line is not None else f"{path}:"
    assert msg.startswith(prefix), msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("task,split", [("mrpc", "train"), ("cola", "test"), ("gsm8k", "test"), ("boolq", "train")])
def test_missing_file(tmp_path, task, split):
    (tmp_path / "raw").mkdir()
    spec = get_task(task)
    path = tmp_path / "raw" / (spec.train_file if split == "train" else spec.test_file)
    msg = _expect(tmp_path, task, split, path, None, "not found")
    assert path.name in msg


@pytest.mark.parametrize("task,line", [("mrpc", 17), ("cola", 1), ("stsb", 300), ("gsm8k", 42), ("boolq", 9)])
def test_non_utf8(tmp_path, task, line):
    path = _copy(tmp_path, task)
    _edit_line(path, line, lambda b: b[:3] + b"\xe9\xff" + b[3:])
    _expect(tmp_path, task, "train", path, line, "UTF-8")


@pytest.mark.parametrize(
    "task,line,ncols",
    [("mrpc", 17, 5), ("rte", 100, 4), ("cola", 8551, 4), ("sst2", 2, 2), ("stsb", 5750, 10)],
)
def test_wrong_column_count_missing_tab(tmp_path, task, line, ncols):
    path = _copy(tmp_path, task)
    _edit_line(path, line, lambda b: b.replace(b"\t", b" ", 1))
    _expect(tmp_path, task, "train", path, line, f"expected {ncols} tab-separated columns, found {ncols - 1}")


def test_wrong_column_count_extra_tab(tmp_path):
    path = _copy(tmp_path, "mrpc", "test")
    _edit_line(path, 409, lambda b: b + b"\textra")  # last data row
    _expect(tmp_path, "mrpc", "test", path, 409, "found 6")


def test_blank_line_in_middle(tmp_path):
    path = _copy(tmp_path, "rte")
    _edit_line(path, 50, lambda b: b"")
    _expect(tmp_path, "rte", "train", path, 50, "blank line")


def test_crlf_line_endings_are_accepted(tmp_path):
    path = _copy(tmp_path, "rte", "test")
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    rows = get_task("rte").read(tmp_path / "raw", "test")
    assert rows == _read("rte", "test")


@pytest.mark.parametrize(
    "task,line,col,value,word",
    [
        ("mrpc", 17, 0, b"2", "not 0 or 1"),
        ("cola", 3, 1, b"2", "not 0 or 1"),
        ("cola", 5, 1, b"yes", "not 0 or 1"),
        ("sst2", 1000, 1, b"-1", "not 0 or 1"),
        ("rte", 7, 3, b"neutral", "entailment"),
        ("stsb", 12, 9, b"5.5", "outside [0, 5]"),
        ("stsb", 13, 9, b"-0.1", "outside [0, 5]"),
        ("stsb", 14, 9, b"nan", "outside [0, 5]"),
        ("stsb", 15, 9, b"high", "not a number"),
    ],
)
def test_bad_label(tmp_path, task, line, col, value, word):
    path = _copy(tmp_path, task)

    def put(b: bytes) -> bytes:
        cols = b.split(b"\t")
        cols[col] = value
        return b"\t".join(cols)

    _edit_line(path, line, put)
    _expect(tmp_path, task, "train", path, line, word)


def test_wrong_header(tmp_path):
    path = _copy(tmp_path, "mrpc")
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[1:]))  # header row dropped
    _expect(tmp_path, "mrpc", "train", path, 1, "header")


def test_empty_text(tmp_path):
    path = _copy(tmp_path, "sst2")
    _edit_line(path, 4, lambda b: b"  \t1")
    _expect(tmp_path, "sst2", "train", path, 4, "empty")


@pytest.mark.parametrize(
    "task,content",
    [
        ("mrpc", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"),  # header only
        ("rte", "index\tsentence1\tsentence2\tlabel"),
        ("cola", ""),
        ("sst2", ""),
        ("gsm8k", "\n\n"),
        ("boolq", "[\n]\n"),
        ("boolq", ""),
    ],
)
def test_empty_split(tmp_path, task, content):
    path = _copy(tmp_path, task)
    path.write_text(content, encoding="utf-8")
    msg = _expect(tmp_path, task, "train", path, None)
    assert re.search(r"no data rows|no examples|empty", msg), msg


def test_gsm8k_malformed_json_line(tmp_path):
    path = _copy(tmp_path, "gsm8k")
    _edit_line(path, 10, lambda b: b[: len(b) // 2])  # truncated line
    _expect(tmp_path, "gsm8k", "train", path, 10, "malformed JSON")


def test_gsm8k_bad_record(tmp_path):
    path = _copy(tmp_path, "gsm8k", "test")
    _edit_line(path, 5, lambda b: json.dumps({"question": "q?", "answer": "no final line"}).encode())
    _edit_line(path, 6, lambda b: json.dumps({"question": "q?"}).encode())
    _expect(tmp_path, "gsm8k", "test", path, 5, "####")
    _edit_line(path, 5, lambda b: json.dumps({"question": "q?", "answer": "x\n#### 3"}).encode())
    _expect(tmp_path, "gsm8k", "test", path, 6, "missing field 'answer'")
    _edit_line(path, 6, lambda b: b"[1, 2]")
    _expect(tmp_path, "gsm8k", "test", path, 6, "JSON object")


def _element_lines(path: Path) -> list[int]:
    """1-based lines where the pretty-printed boolq array's elements start (lines that are just '{')."""
    return [i for i, ln in enumerate(path.read_text().split("\n"), start=1) if ln.strip() == "{"]


def test_boolq_malformed_json(tmp_path):
    path = _copy(tmp_path, "boolq")
    starts = _element_lines(path)
    line = starts[1000] + 2  # the "input" line of element 1000
    _edit_line(path, line, lambda b: b.replace(b'"input": "",', b'"input": "" "oops",'))
    _expect(tmp_path, "boolq", "train", path, line, "malformed JSON")


def test_boolq_missing_comma_between_elements(tmp_path):
    path = _copy(tmp_path, "boolq", "test")
    starts = _element_lines(path)
    end = starts[3] - 1  # the "}," closing element 2
    _edit_line(path, end, lambda b: b.replace(b"},", b"}"))
    _expect(tmp_path, "boolq", "test", path, starts[3], "malformed JSON")


def test_boolq_trailing_garbage(tmp_path):
    path = _copy(tmp_path, "boolq", "test")
    n = len(path.read_text().split("\n"))
    path.write_text(path.read_text() + "x\n")
    _expect(tmp_path, "boolq", "test", path, n, "extra data")


def test_boolq_not_an_array(tmp_path):
    path = _copy(tmp_path, "boolq")
    path.write_text('\n{"instruction": "x"}\n')
    _expect(tmp_path, "boolq", "train", path, 2, "JSON array")


@pytest.mark.parametrize(
    "change,word",
    [
        (lambda d: d.update(answer="maybe"), "'true' or 'false'"),
        (lambda d: d.pop("answer"), "missing field 'answer'"),
        (lambda d: d.update(instruction="Is the sky blue?"), "LLM-Adapters BoolQ prompt"),
        (lambda d: d.update(instruction=BOOLQ_PREFIX + " " + BOOLQ_SUFFIX), "question inside 'instruction' is empty"),
    ],
)
def test_boolq_bad_record(tmp_path, change, word):
    path = _copy(tmp_path, "boolq")
    data = json.loads(path.read_text())
    change(data[7])
    path.write_text(json.dumps(data, indent=4))  # same layout: element k starts on line 2 + 6k
    starts = _element_lines(path)
    assert starts[7] == 2 + 6 * 7
    _expect(tmp_path, "boolq", "train", path, starts[7], word)


def test_message_is_dataerror_not_traceback(tmp_path):
    """A DataError for a bad file is one clear line: file:line: what is wrong (how to fix it)."""
    path = _copy(tmp_path, "mrpc")
    _edit_line(path, 17, lambda b: b.rsplit(b"\t", 1)[0])
    msg = _expect(tmp_path, "mrpc", "train", path, 17)
    assert msg == f"{path}:17: expected 5 tab-separated columns, found 4 (check for a stray tab or a truncated line)"
