"""Low-level readers of data files: every problem is a :class:`DataError` naming the file and, where one
applies, the 1-based line, what is wrong and how to fix it. Used by the built-in tasks' readers
(:mod:`pipeline.data.builtin`) and by declared sources (:mod:`pipeline.data.records`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator


class DataError(Exception):
    """A problem with the user's data files (not a bug): the message says where, what and how to fix it."""


# --------------------------------------------------------------------------------------
# Low-level readers
# --------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
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


def split_lines(text: str) -> list[str]:
    """Split on '\\n' only (never str.splitlines: text may hold \\x0b, \\x1c, U+2028 ...); a final newline ends
    the last line rather than starting an empty one; a '\\r' before '\\n' (CRLF files) is dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line, parsed value) for every non-blank line."""
    for i, line in enumerate(split_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}); each line must be one complete JSON object"
            ) from None


_JSON_WS = re.compile(r"[ \t\n\r]*")


def read_json_array(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line where the element starts, parsed value) for each element of a top-level JSON array."""
    text = read_text(path)
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
