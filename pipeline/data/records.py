"""Reading declared sources into records, each with where it came from (``file:line`` or ``file row i``).

Local files are parsed here, not through ``datasets.load_dataset``: a bad record must be named by
its file and line (JSONL, JSON, CSV, TSV) or row index (Parquet), which ``load_dataset`` does not
report. Hugging Face ids go through ``datasets.load_dataset`` (network needed: HF_HUB_OFFLINE unset).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterator

from pipeline.config.split_source import SourceConfig
from pipeline.data.readers import DataError
from pipeline.data.builtin import read_json_array, read_jsonl, read_text

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}

Record = tuple[str, dict]  # (where, record)


def describe(src: SourceConfig) -> str:
    return src.path if src.path is not None else f"hf:{src.hf}" + (f"/{src.config}" if src.config else "") + f"[{src.split}]"


def files_of(src: SourceConfig) -> list[Path]:
    """The local files a source reads (a folder: its supported files, sorted); [] for a Hub source."""
    if src.path is None:
        return []
    p = Path(src.path)
    if not p.exists():
        raise DataError(f"{p}: file not found (check the path in data.datasets; paths are relative to the repository root)")
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        if not found:
            raise DataError(f"{p}: folder holds no {'/'.join(sorted(EXTENSIONS))} files")
        return found
    return [p]


def _file_type(path: Path, declared: str | None) -> str:
    if declared:
        return declared
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported extension {path.suffix!r}; use one of {sorted(EXTENSIONS)} or state the file type (type: jsonl|json|csv|tsv|parquet)"
        )
    return kind


def _objects(path: Path, it: Iterator[tuple[int, object]]) -> Iterator[Record]:
    for line, obj in it:
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object (one record), found {type(obj).__name__}")
        yield where, obj


def _delimited(path: Path, delimiter: str) -> Iterator[Record]:
    text = read_text(path)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # TSVs (GLUE) keep quotes as text
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: file is empty (expected a header row with the column names, then data rows)")
        header = [h.strip() for h in header]
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{where}: expected {len(header)} columns (header {header}), found {len(row)} (a stray delimiter or an unclosed quote?)"
                )
            yield where, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({e})") from None


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for i, r in enumerate(rows):
        yield f"{path} row {i}", r


def _hub(src: SourceConfig) -> Iterator[Record]:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DataError(
            f"hf:{src.hf}: a Hugging Face dataset needs the Hub, but HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} is set "
            "(python -m pipeline.run sets it unless you do); with network access run `HF_HUB_OFFLINE=0 python -m pipeline.run`, "
            "or download the files and give their local path instead"
        )
    from datasets import load_dataset

    try:
        ds = load_dataset(src.hf, src.config, split=src.split, revision=src.revision)
    except Exception as e:  # noqa: BLE001 -- the hub raises many types; the user needs the message
        raise DataError(f"hf:{src.hf}: cannot load ({type(e).__name__}: {e})") from None
    for i, r in enumerate(ds):
        yield f"{describe(src)} row {i}", dict(r)


def read_source(src: SourceConfig) -> Iterator[Record]:
    """Every record of ``src`` with its location."""
    if src.hf is not None:
        yield from _hub(src)
        return
    for path in files_of(src):
        kind = _file_type(path, src.type)
        if kind == "jsonl":
            yield from _objects(path, read_jsonl(path))
        elif kind == "json":
            yield from _objects(path, read_json_array(path))
        elif kind == "csv":
            yield from _delimited(path, ",")
        elif kind == "tsv":
            yield from _delimited(path, "\t")
        else:
            yield from _parquet(path)


_MISSING = object()


def get_path(record: Any, path: str) -> Any:
    """``record['a']['b'][0]`` for path ``a.b.0``; _MISSING when absent. A top-level key containing dots wins."""
    if isinstance(record, dict) and path in record:
        return record[path]
    cur = record
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def column(record: dict, path: str, where: str, role: str, dataset: str, required: bool = True) -> Any:
    v = get_path(record, path)
    if v is _MISSING:
        if not required:
            return None
        raise DataError(
            f"{where}: column {path!r} (role {role!r} of data.datasets.{dataset}) not found; columns found: {sorted(record)}; map it with data.datasets.{dataset}.columns.{role}"
        )
    return v


def explode(records: Iterator[Record], path: str | None, dataset: str) -> Iterator[Record]:
    """One record per element of the list at ``path`` (the element replaces the list under its key)."""
    if path is None:
        yield from records
        return
    for where, r in records:
        items = get_path(r, path)
        if items is _MISSING:
            raise DataError(f"{where}: column {path!r} (data.datasets.{dataset}.explode) not found; columns found: {sorted(r)}")
        if not isinstance(items, list):
            raise DataError(f"{where}: column {path!r} (data.datasets.{dataset}.explode) must be a list, found {type(items).__name__}")
        for k, item in enumerate(items):
            yield f"{where} [{path}[{k}]]", _nest(r, path, item)


def _nest(record: dict, path: str, item: Any) -> dict:
    """A copy of ``record`` with the value at dotted ``path`` replaced by ``item``."""
    parts = path.split(".")
    out = dict(record)
    cur = out
    for part in parts[:-1]:
        cur[part] = dict(cur[part])
        cur = cur[part]
    cur[parts[-1]] = item
    return out
