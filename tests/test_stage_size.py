"""Stages stay thin: every ``stages/*.py`` reads setup -> run -> write in at most 80 code lines (not blank,
not a comment, not a docstring); what a stage does lives in ``pipeline/stage/`` (training, scoring, merging)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_CODE_LINES = 80
STAGES = sorted((ROOT / "stages").glob("*.py"))


def code_lines(text: str) -> int:
    """Lines that hold a token of code: blank lines, comments and docstrings (module, class, function) do not count."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in skip:
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - docstrings)


def test_the_counter_skips_blank_lines_comments_and_docstrings():
    text = '"""Module\n\ndoc."""\n\n# a comment\nimport os  # trailing\n\n\ndef f(\n    x,\n):\n    """Doc."""\n    s = """not a\n    docstring"""\n    return x\n'
    assert code_lines(text) == 7  # import, def f( x, ):, s = """ (2 lines), return


@pytest.mark.parametrize("path", STAGES, ids=[p.name for p in STAGES])
def test_every_stage_is_at_most_80_code_lines(path):
    n = code_lines(path.read_text(encoding="utf-8"))
    assert n <= MAX_CODE_LINES, f"{path.relative_to(ROOT)}: {n} code lines; move what it does into pipeline/stage/ (setup -> run -> write)"
