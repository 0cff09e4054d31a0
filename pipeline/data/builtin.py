"""The built-in tasks (:data:`TASKS`): where each one's raw files live, how to read them, how to score them.

Every reader validates what it reads and reports problems as :class:`DataError` with the
file name and, where one applies, the 1-based line number, what is wrong and how to fix it.

Example formats returned by :meth:`pipeline.data.task.TaskSpec.read`:

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

import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.readers import DataError, read_json_array, read_jsonl, read_text, split_lines
from pipeline.data.task import TaskSpec


BOOLQ_PREFIX = "Please answer the following question with true or false, question: "
BOOLQ_SUFFIX = "\n\nAnswer format: true/false"


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
    lines = split_lines(read_text(path))
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
    for line, obj in read_jsonl(path):
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
    for line, obj in read_json_array(path):
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
