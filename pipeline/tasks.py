"""Task definitions: where each task's raw files live, how to read them, and how to score them.

Every reader validates what it reads and reports problems as :class:`DataError` with the
file name and, where one applies, the 1-based line number, what is wrong and how to fix it.

Example formats returned by :meth:`TaskSpec.read`:

* GLUE (mrpc, rte, cola, sst2, stsb): ``{"text_a": str, "text_b": str | None, "label": int | float}``.
  Text is kept exactly as in the file (SST-2 rows often end in a space). Labels:
  mrpc 1 = paraphrase; rte 0 = entailment, 1 = not_entailment (the Hugging Face ``glue``
  convention); cola 1 = acceptable; sst2 1 = positive; stsb a float score in [0, 5].
  ``text_b`` is ``None`` for the single-sentence tasks (cola, sst2).
* gsm8k: ``{"question": str, "answer": str}``; ``answer`` is the full worked solution, ending
  in the ``#### <final answer>`` line (calculator annotations ``<<...>>`` kept).
* boolq (LLM-Adapters release, closed book, no passage): ``{"question": str, "answer": "true" | "false"}``.
  ``question`` is taken out of the LLM-Adapters ``instruction`` prompt
  (``BOOLQ_PREFIX + question + BOOLQ_SUFFIX``); ``input`` (always empty) and ``output``
  (``"the correct answer is <answer>"``) are dropped: the prompt can be rebuilt from the
  two constants below and the target from ``answer``.

GLUE test labels are not public, so the ``test`` split of every GLUE task is its ``dev.tsv``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

SPLITS = ("train", "test")

BOOLQ_PREFIX = "Please answer the following question with true or false, question: "
BOOLQ_SUFFIX = "\n\nAnswer format: true/false"


class DataError(Exception):
    """A problem with the user's data files (not a bug): the message says where, what and how to fix it."""


# --------------------------------------------------------------------------------------
# Low-level readers
# --------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """Whole file as text (UTF-8, a leading BOM dropped), or DataError naming the file/line."""
    if not path.exists():
        raise DataError(f"{path}: file not found (copy the raw data into place; see the README next to it)")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (expected the data file here, found a directory or special file)")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : e.start + 4]
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {bad[:1].hex()} at byte offset {e.start}); "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _lines(text: str) -> list[str]:
    """Split on '\\n' only (never str.splitlines: text may hold \\x0b, \\x1c, U+2028 ...); a final newline ends
    the last line rather than starting an empty one; a '\\r' before '\\n' (CRLF files) is dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


@dataclass(frozen=True)
class _TsvFormat:
    header: tuple[str, ...] | None  # expected header row; None = the file has no header
    ncols: int
    text_cols: tuple[int, ...]  # 1 or 2 column indices: text_a [, text_b]
    label_col: int
    label_kind: str  # "binary" | "rte" | "score"


_RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def _parse_label(raw: str, kind: str, where: str) -> int | float:
    value = raw.strip()
    if kind == "binary":
        if value in ("0", "1"):
            return int(value)
        raise DataError(f"{where}: label {raw!r} is not 0 or 1 (this is a binary task; fix the label column)")
    if kind == "rte":
        if value in _RTE_LABELS:
            return _RTE_LABELS[value]
        raise DataError(f"{where}: label {raw!r} is not 'entailment' or 'not_entailment' (fix the label in the last column)")
    if kind == "score":
        try:
            score = float(value)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number (expected a similarity score in [0, 5])") from None
        if not math.isfinite(score) or not 0.0 <= score <= 5.0:
            raise DataError(f"{where}: score {raw!r} is outside [0, 5] (STS-B scores run from 0.0 to 5.0)")
        return score
    raise AssertionError(kind)


def _read_tsv(path: Path, fmt: _TsvFormat) -> list[dict]:
    lines = _lines(_read_text(path))
    start = 0
    if fmt.header is not None:
        if not lines:
            raise DataError(f"{path}: file is empty (expected a header row {'<TAB>'.join(fmt.header)!r} and data rows)")
        found = tuple(c.strip() for c in lines[0].split("\t"))
        if found != fmt.header:
            raise DataError(
                f"{path}:1: unexpected header {lines[0]!r}; expected the columns {list(fmt.header)} "
                "separated by tabs (is this the right file, or is the header row missing?)"
            )
        start = 1
    examples = []
    for i in range(start, len(lines)):
        line = lines[i]
        where = f"{path}:{i + 1}"
        if not line.strip():
            raise DataError(f"{where}: blank line (remove it; every line must be a data row with {fmt.ncols} columns)")
        cols = line.split("\t")
        if len(cols) != fmt.ncols:
            raise DataError(
                f"{where}: expected {fmt.ncols} tab-separated columns, found {len(cols)} (check for a stray tab or a truncated line)"
            )
        texts = [cols[c] for c in fmt.text_cols]
        for c, t in zip(fmt.text_cols, texts):
            if not t.strip():
                raise DataError(f"{where}: column {c + 1} (the text) is empty (fill it in or delete the row)")
        label = _parse_label(cols[fmt.label_col], fmt.label_kind, where)
        examples.append({"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label})
    if not examples:
        raise DataError(f"{path}: no data rows (the file is empty or holds only a header; restore the data)")
    return examples


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line, parsed value) for every non-blank line."""
    for i, line in enumerate(_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}); each line must be one complete JSON object"
            ) from None


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _read_json_array(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line where the element starts, parsed value) for each element of a top-level JSON array."""
    text = _read_text(path)
    dec = json.JSONDecoder()
    line, pos = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, pos
        line += text.count("\n", pos, i)
        pos = i
        return line

    def malformed(e: json.JSONDecodeError) -> DataError:
        return DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the syntax there")

    i = _JSON_WS.match(text, 0).end()
    if i >= len(text):
        raise DataError(f"{path}: file is empty (expected a JSON array of examples)")
    if text[i] != "[":
        raise DataError(f"{path}:{line_at(i)}: expected a JSON array ('[ {{...}}, ... ]') at the top level, found {text[i]!r}")
    i = _JSON_WS.match(text, i + 1).end()
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise malformed(e) from None
            yield line_at(i), obj
            i = _JSON_WS.match(text, end).end()
            if text.startswith(",", i):
                i = _JSON_WS.match(text, i + 1).end()
            elif text.startswith("]", i):
                i += 1
                break
            else:
                what = repr(text[i]) if i < len(text) else "end of file"
                raise DataError(f"{path}:{line_at(i)}: malformed JSON (expected ',' or ']' after an element, found {what})")
    i = _JSON_WS.match(text, i).end()
    if i < len(text):
        raise DataError(f"{path}:{line_at(i)}: malformed JSON (extra data after the closing ']'; remove it)")


def _str_field(obj: object, key: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with {key!r}, found {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} (every example needs it)")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, found {value!r}")
    return value


_GSM8K_FINAL = re.compile(r"^#### .*\S", re.MULTILINE)


def _read_gsm8k(path: Path) -> list[dict]:
    examples = []
    for line, obj in _read_jsonl(path):
        where = f"{path}:{line}"
        question = _str_field(obj, "question", where)
        answer = _str_field(obj, "answer", where)
        if not _GSM8K_FINAL.search(answer):
            raise DataError(f"{where}: 'answer' has no final '#### <number>' line (GSM8K solutions end with one)")
        examples.append({"question": question, "answer": answer})
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty; restore the data)")
    return examples


def _read_boolq(path: Path) -> list[dict]:
    examples = []
    for line, obj in _read_json_array(path):
        where = f"{path}:{line}"
        instruction = _str_field(obj, "instruction", where)
        answer = _str_field(obj, "answer", where).strip().lower()
        if answer not in ("true", "false"):
            raise DataError(f"{where}: 'answer' is {obj['answer']!r}; expected 'true' or 'false'")
        if not (instruction.startswith(BOOLQ_PREFIX) and instruction.endswith(BOOLQ_SUFFIX)):
            raise DataError(
                f"{where}: 'instruction' does not follow the LLM-Adapters BoolQ prompt "
                f"{BOOLQ_PREFIX + '<question>' + BOOLQ_SUFFIX!r} (is this the LLM-Adapters boolq file?)"
            )
        question = instruction[len(BOOLQ_PREFIX) : len(instruction) - len(BOOLQ_SUFFIX)]
        if not question.strip():
            raise DataError(f"{where}: the question inside 'instruction' is empty")
        examples.append({"question": question, "answer": answer})
    if not examples:
        raise DataError(f"{path}: no examples (the JSON array is empty; restore the data)")
    return examples


# --------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    name: str  # key used in params.yaml
    kind: str  # "classification" | "regression" | "generation"
    num_labels: int  # 1 for regression, 0 for generation
    metrics: tuple[str, ...]  # names understood by bilora.metrics.compute
    main_metric: str
    train_file: str  # relative to the raw data directory
    test_file: str  # GLUE: dev.tsv (test labels are not public)
    licence_file: str  # README holding the licence note
    _reader: Callable[[Path], list[dict]] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    format: str = "classification"  # pipeline/formats/<format>.py renders and scores the records
    options: dict = field(default_factory=dict, compare=False)  # the format's options (DatasetConfig fields)
    declared: bool = False  # a data.datasets entry (read by pipeline.catalog), not a shipped reader
    adapter_from: str | None = None  # eval-only (no train split): evaluated with this task's adapters

    def path(self, raw_dir: str | Path, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; expected one of {list(SPLITS)}")
        return Path(raw_dir) / (self.train_file if split == "train" else self.test_file)

    def read(self, raw_dir: str | Path, split: str) -> list[dict]:
        """Read and validate one split; raises DataError for any problem with the file."""
        if self._reader is None:
            raise TypeError(f"task {self.name!r} was built without a reader")
        return self._reader(self.path(raw_dir, split))


def _glue(name, kind, num_labels, metrics, main_metric, folder, fmt) -> TaskSpec:
    columns = {"text": "text_a", "label": "label"} | ({"text_pair": "text_b"} if len(fmt.text_cols) == 2 else {})
    return TaskSpec(
        format=kind,
        options={"columns": columns, "labels": ["0", "1"]} if kind == "classification" else {"columns": columns},
        name=name,
        kind=kind,
        num_labels=num_labels,
        metrics=metrics,
        main_metric=main_metric,
        train_file=f"glue/{folder}/train.tsv",
        test_file=f"glue/{folder}/dev.tsv",
        licence_file=f"glue/{folder}/README.md",
        _reader=lambda p: _read_tsv(p, fmt),
    )


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        _glue(
            "mrpc",
            "classification",
            2,
            ("accuracy", "f1"),
            "accuracy",
            "MRPC",
            _TsvFormat(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 5, (3, 4), 0, "binary"),
        ),
        _glue(
            "rte",
            "classification",
            2,
            ("accuracy",),
            "accuracy",
            "RTE",
            _TsvFormat(("index", "sentence1", "sentence2", "label"), 4, (1, 2), 3, "rte"),
        ),
        _glue(
            "cola",
            "classification",
            2,
            ("mcc", "accuracy"),
            "mcc",
            "CoLA",
            _TsvFormat(None, 4, (3,), 1, "binary"),
        ),
        _glue(
            "sst2",
            "classification",
            2,
            ("accuracy",),
            "accuracy",
            "SST-2",
            _TsvFormat(("sentence", "label"), 2, (0,), 1, "binary"),
        ),
        _glue(
            "stsb",
            "regression",
            1,
            ("pearson", "spearman"),
            "pearson",
            "STS-B",
            _TsvFormat(
                ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"),
                10,
                (7, 8),
                9,
                "score",
            ),
        ),
        TaskSpec(
            name="gsm8k",
            kind="generation",
            num_labels=0,
            metrics=("exact_match",),
            main_metric="exact_match",
            train_file="gsm8k/train.jsonl",
            test_file="gsm8k/test.jsonl",
            licence_file="gsm8k/README.md",
            _reader=_read_gsm8k,
            format="prompt_completion",
            options={
                "columns": {"prompt": "question", "completion": "answer"},
                "prompt_template": "Question: {prompt}\nAnswer:",
                "completion_template": " {completion}",
                "strip_completion": True,
                "extraction": "final_number",
                "stop": ["\nQuestion:"],
            },
        ),
        TaskSpec(
            name="boolq",
            kind="generation",
            num_labels=0,
            metrics=("accuracy",),
            main_metric="accuracy",
            train_file="boolq/train.json",
            test_file="boolq/test.json",
            licence_file="boolq/README.md",
            _reader=_read_boolq,
            format="multiple_choice",
            options={
                "columns": {"prompt": "question", "answer": "answer"},
                "prompt_template": BOOLQ_PREFIX + "{prompt}" + BOOLQ_SUFFIX + "\nAnswer:",
                "choices": ["true", "false"],
            },
        ),
    ]
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
