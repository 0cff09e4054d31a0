"""A quiet, readable terminal: known third-party noise is filtered, our messages are one line, tables fit 80 columns."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.terminal.quiet import only_head_missing, quiet
from pipeline.run import summary_table

ROOT = Path(__file__).resolve().parents[1]
KNOWN = "known: built-in ['boolq', 'cola', 'gsm8k', 'mrpc', 'rte', 'sst2', 'stsb']"


class _Records(logging.Handler):
    """Collects what passes a logger's filters (a handler on the logger itself sees only that)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _capture(name: str) -> tuple[logging.Logger, _Records]:
    logger, rec = logging.getLogger(name), _Records()
    logger.addHandler(rec)
    return logger, rec


def _render(table) -> str:
    c = Console(width=80, record=True, file=open(os.devnull, "w"))
    c.print(table)
    return c.export_text()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "PYTHONWARNINGS")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_validate_bad_params_prints_our_one_message_and_imports_no_ml_stack(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  tasks: [nope]\n")
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.validate", str(bad)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "kernels-community" not in out and "Traceback" not in out and "Warning" not in out, out
    assert out.count("error:") == 1 and "data.tasks" in out
    assert KNOWN in out, out  # not hard-wrapped at 80 columns: the message is one line per problem
    # The schema is derived from the method registry (bilora/methods), so checking params imports torch,
    # peft and bitsandbytes; the noise filters are installed before that import (pipeline/validate.py).
    probe = (
        "import sys\nfrom pipeline.validate import main\ntry:\n    main([sys.argv[1]])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('heavy', sorted(m for m in ('torch', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(bad)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert "exit 2" in r.stdout and "kernels-community" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_bitsandbytes_kernels_notice_is_dropped_other_warnings_kept():
    quiet()
    logger, rec = _capture("bitsandbytes.backends.cpu.ops")
    try:
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install kernels`",
            "No module named 'kernels'",
        )
        logger.warning("some other bitsandbytes problem")
    finally:
        logger.removeHandler(rec)
    assert rec.messages == ["some other bitsandbytes problem"]


def test_load_report_dropped_for_a_fresh_head_only(tmp_path):
    """Loading a headless base with a task head (what every stage does) logs no LOAD REPORT; a base
    missing a backbone weight still does."""
    from transformers import BertConfig, BertModel

    from bilora.base import load_for_task

    quiet()
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    BertModel(cfg).save_pretrained(tmp_path / "full")
    BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "no_pooler")
    logger, rec = _capture("transformers.modeling_utils")
    try:
        load_for_task(tmp_path / "full", "classification", 2)
        assert not [m for m in rec.messages if "LOAD REPORT" in m], rec.messages
        load_for_task(tmp_path / "no_pooler", "classification", 2)
    finally:
        logger.removeHandler(rec)
    reports = [m for m in rec.messages if "LOAD REPORT" in m]
    assert len(reports) == 1 and "pooler" in reports[0] and "classifier" in reports[0], rec.messages


@pytest.mark.parametrize(
    ("report", "head_only"),
    [
        (
            "X LOAD REPORT from: p\nKey | Status | \n--+--\nclassifier.weight | MISSING | \nscore.bias | \x1b[31mMISSING\x1b[0m | \n\nNotes:",
            True,
        ),
        ("X LOAD REPORT from: p\nKey | Status | \nclassifier.weight | MISSING | \nbert.pooler.dense.weight | MISSING | ", False),
        ("X LOAD REPORT from: p\nKey | Status | \nclassifier.weight | MISMATCH | Reinit due to size mismatch", False),
        ("X LOAD REPORT from: p\nKey | Status | \nclassifier.weight | UNEXPECTED | ", False),
        ("X LOAD REPORT from: p\n(a format we cannot read)", False),
    ],
)
def test_only_head_missing(report, head_only):
    assert only_head_missing(report) is head_only


def _longest_summary() -> dict:
    s = json.loads((ROOT / "reports" / "comparison" / "summary.json").read_text())
    s |= json.loads((ROOT / "reports" / "summary.json").read_text())
    s["gsm8k.bilevel_lora"] = {
        "main_metric": "exact_match",
        "mean": 0.0123456,
        "std": 0.0067891,
        "n_seeds": 10,
        "median_step_time": 123.4567,
    }
    return s


def test_summary_table_fits_80_columns_uncut():
    s = _longest_summary()
    text = _render(summary_table(s))
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= 80
    for key, row in s.items():
        assert key in text and row["main_metric"] in text
        for v in (f"{row['mean']:.4f}", f"{row['std']:.4f}", f"{row['median_step_time']:.3f}"):
            assert v in text, (key, v)


def test_report_stage_table_fits_80_columns_uncut():
    from pipeline.report.tables import terminal_table

    rows = [
        {
            "task": "sst2",
            "method": "lora",
            "main": "accuracy",
            "seeds": 3,
            "mean": 0.7943,
            "std": 0.0078,
            "gap": "+0.0976",
            "sharpness": "full 0.0058\nlora 0.0008",
            "attack": "full 0.5117\nlora 0.5130",
            "step_time": 0.665,
        },
        {
            "task": "gsm8k",
            "method": "bilevel_lora",
            "main": "exact_match",
            "seeds": 1,
            "mean": 0.02,
            "std": 0.0,
            "gap": "n/a",
            "sharpness": "-",
            "attack": "lora 0.0100",
            "step_time": 123.456,
        },
    ]
    text = _render(terminal_table(rows))
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= 80
    for v in (
        "sst2.lora",
        "gsm8k.bilevel_lora",
        "accuracy, n=3",
        "exact_match, n=1",
        "0.7943",
        "±0.0078",
        "+0.0976",
        "full 0.0058",
        "lora 0.0008",
        "full 0.5117",
        "lora 0.5130",
        "0.665",
        "lora 0.0100",
        "123.456",
        "reports/report.md",
    ):
        assert v in text, v


def test_non_finite_error_is_a_user_error_once_the_methods_are_imported():
    from bilora.methods.method import NonFiniteError
    from pipeline.terminal.user_error import user_errors

    assert NonFiniteError in user_errors()
