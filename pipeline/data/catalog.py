"""Every task by name: the shipped entries of :data:`pipeline.data.builtin.TASKS` and the user's
``data.datasets``, read and validated into the canonical records of their format.

Stages look tasks up here (``get_task(name, params.data)``); nothing outside pipeline/data/formats
branches on a task's name or format.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.data import formats
from pipeline.config.schema import DataConfig, DatasetConfig, label_count
from pipeline.data.formats.classification import raw_label
from pipeline.data.records import column, describe, explode, files_of, read_source
from pipeline.data.builtin import TASKS
from pipeline.data.readers import DataError
from pipeline.data.task import TaskSpec


def _num_labels(d: DatasetConfig) -> int | None:
    if d.format == "classification":
        return label_count(d.labels)  # None: inferred by prepare (stats.json)
    return 1 if d.format == "regression" else 0


def _metrics(d: DatasetConfig, opts: dict[str, Any]) -> tuple[str, ...]:
    """Declared metrics, else the format's default; classification labels inferred from train are not
    known before prepare: ('accuracy', 'f1') until :func:`prepared_task` resolves them from stats.json."""
    if d.metrics:
        return tuple(d.metrics)
    return (
        formats.get(d.format).default_metrics(opts)
        if d.format != "classification" or opts.get("labels") is not None
        else ("accuracy", "f1")
    )


def declared_task(name: str, d: DatasetConfig) -> TaskSpec:
    fmt = formats.get(d.format)
    opts = d.model_dump() | {"name": name}
    metrics = _metrics(d, opts)
    test_file = describe(d.test) if d.test else f"{describe(d.train)} (test_fraction {d.test_fraction})"  # type: ignore[arg-type]
    return TaskSpec(
        name=name,
        kind=fmt.kind,
        num_labels=_num_labels(d),
        metrics=metrics,
        main_metric=d.main_metric or metrics[0],  # type: ignore[arg-type]
        train_file=describe(d.train) if d.train else "",
        test_file=test_file,
        licence_file=d.licence or "",
        format=d.format,
        options=opts,
        declared=True,
        adapter_from=d.adapter_from,
    )


def prepared_task(name: str, data: DataConfig, data_dir: str | Path) -> TaskSpec:
    """The task as prepare recorded it (stats.json): classification labels inferred from train filled
    in, and the default metrics resolved from their number (binary F1 for two, macro F1 beyond)."""
    task = get_task(name, data)
    if task.format != "classification" or not task.declared:
        return task
    d = data.datasets[name]
    labels = _stats(data_dir).get(name, {}).get("meta", {}).get("labels", d.labels)
    opts = dict(task.options) | {"labels": labels}
    metrics = _metrics(d, opts)
    return dataclasses.replace(task, options=opts, metrics=metrics, main_metric=d.main_metric or metrics[0], num_labels=label_count(labels))


def _stats(data_dir: str | Path) -> dict[str, Any]:
    stats = Path(data_dir) / "stats.json"
    try:
        return json.loads(stats.read_text())
    except OSError:
        raise DataError(f"{stats}: not found; run `dvc repro prepare` first") from None


def adapter_task(task: TaskSpec) -> str:
    """The task whose fine-tuned adapters ``task`` is evaluated with: its adapter_from (eval-only), else itself."""
    return task.adapter_from or task.name


def head_labels(task: TaskSpec, data: DataConfig, data_dir: str | Path) -> int:
    """Head size for evaluating ``task``: that of the adapter's task; an eval-only classification set must match it."""
    n = num_labels(get_task(adapter_task(task), data), data_dir)
    if task.adapter_from is not None and task.format == "classification" and task.num_labels != n:
        raise DataError(
            f"data.datasets.{task.name}.labels: {task.num_labels} labels, but the adapter of {task.adapter_from!r} has a {n}-class head; declare the same label set"
        )
    return n


def get_task(name: str, data: DataConfig | None = None) -> TaskSpec:
    if name in TASKS:
        return TASKS[name]
    if data is not None and name in data.datasets:
        return declared_task(name, data.datasets[name])
    known = sorted(TASKS) + sorted(data.datasets if data else [])
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(known)}")


def options(task: TaskSpec) -> dict[str, Any]:
    return {"name": task.name} | dict(task.options)


def _infer_labels(records: list[tuple[str, dict]], opts: dict) -> list[str]:
    col = (opts.get("columns") or {}).get("label", "label")
    values = {raw_label(column(r, col, w, "label", opts["name"])) for w, r in records}
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _normalise(task: TaskSpec, records: list[tuple[str, dict]], opts: dict, skipped: list[str] | None = None) -> list[dict]:
    """Canonical records; with ``skip_invalid`` the bad ones are left out and their reasons appended to ``skipped``."""
    fmt = formats.get(task.format)
    if not opts.get("skip_invalid"):
        return [fmt.normalise(r, opts, w) for w, r in records]
    out = []
    for w, r in records:
        try:
            out.append(fmt.normalise(r, opts, w))
        except DataError as e:
            skipped.append(str(e))  # type: ignore[union-attr]
    if records and not out:
        raise DataError(
            f"data.datasets.{task.name}: no records left after skip_invalid dropped all {len(records)}; first reason: {skipped[0]}"
        )  # type: ignore[index]
    return out


def _records(src, opts: dict, what: str) -> list[tuple[str, dict]]:
    recs = list(explode(read_source(src), opts.get("explode"), opts["name"]))
    if not recs:
        raise DataError(f"{describe(src)}: no records (the {what} source of data.datasets.{opts['name']} is empty)")
    return recs


def read_splits(task: TaskSpec, data: DataConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(train records, test records, meta) in the format's canonical form; DataError on bad data."""
    opts = options(task)
    if not task.declared:
        raw = Path(data.raw_dir)
        rows = []
        for split in ("train", "test"):
            path = task.path(raw, split)
            rows.append(_normalise(task, [(f"{path} record {i + 1}", r) for i, r in enumerate(task.read(raw, split))], opts))
        return rows[0], rows[1], {}
    d = data.datasets[task.name]
    train = _records(d.train, opts, "train") if d.train is not None else []  # eval-only: no train split
    if d.test is not None:
        test = _records(d.test, opts, "test")
    else:
        import torch

        n = len(train)
        g = torch.Generator().manual_seed(data.split_seed)
        perm = torch.randperm(n, generator=g).tolist()
        n_test = round(d.test_fraction * n)
        if n_test == 0 or n_test == n:
            empty = "test" if n_test == 0 else "train"
            raise DataError(
                f"data.datasets.{task.name}.test_fraction: {d.test_fraction} of {n} records leaves the {empty} split empty; change test_fraction or give a test source"
            )
        test, train = [train[i] for i in sorted(perm[:n_test])], [train[i] for i in sorted(perm[n_test:])]
    meta: dict[str, Any] = {}
    if task.format == "classification":
        if opts.get("labels") is None:
            opts["labels"] = _infer_labels(train, opts)
            if d.metrics and "f1" in d.metrics and len(opts["labels"]) > 2:
                raise DataError(
                    f"data.datasets.{task.name}.metrics: f1 is the binary F1 of class index 1, but train has {len(opts['labels'])} labels {opts['labels']}; use f1_macro"
                )
        meta["labels"] = list(opts["labels"]) if not isinstance(opts["labels"], dict) else dict(opts["labels"])
        meta["num_labels"] = len(set(opts["labels"].values())) if isinstance(opts["labels"], dict) else len(opts["labels"])
    skipped: list[str] = []
    rows = _normalise(task, train, opts, skipped), _normalise(task, test, opts, skipped)
    if skipped:
        meta["skipped"] = {"count": len(skipped), "first": skipped[:5]}
    return rows[0], rows[1], meta


def source_files(task: TaskSpec, data: DataConfig) -> list[Path]:
    if not task.declared:
        return [task.path(data.raw_dir, s) for s in ("train", "test")]
    d = data.datasets[task.name]
    return [f for s in (d.train, d.test) if s is not None for f in files_of(s)]


def num_labels(task: TaskSpec, data_dir: str | Path) -> int:
    """The head size: declared, or recorded by prepare when inferred from train (stats.json)."""
    if task.num_labels is not None:
        return task.num_labels
    stats = Path(data_dir) / "stats.json"
    try:
        return int(json.loads(stats.read_text())[task.name]["meta"]["num_labels"])
    except (OSError, KeyError, ValueError):
        raise DataError(f"{stats}: no label set recorded for {task.name!r}; run `dvc repro prepare` first") from None


def prepared_head(name: str, data_dir: str | Path) -> tuple[str, int]:
    """(format, head size) of a prepared task of data.tasks, from prepare's own record (stats.json) and the
    built-in table: what finetune needs of a task without reading params.yaml."""
    recorded = _stats(data_dir).get(name)
    if recorded is None:
        raise DataError(
            f"{Path(data_dir) / 'stats.json'}: task {name!r} was not prepared; run `dvc repro prepare` (task must be in data.tasks)"
        )
    if name in TASKS:
        return TASKS[name].format, TASKS[name].num_labels
    kind = formats.get(recorded["format"]).kind
    n = {"regression": 1, "generation": 0}.get(kind)
    return recorded["format"], int(recorded["meta"]["num_labels"]) if n is None else n


def check(data: DataConfig, tracked: str | Path | None = None) -> None:
    """Pre-DVC check of every task in ``data.tasks`` and ``data.eval_tasks``: files exist, parse, columns and labels valid.

    ``tracked``: the folder that is prepare's DVC dep (``data``); a local source outside it is refused,
    since DVC would not notice when it changes."""
    for name in data.evaluated:
        task = get_task(name, data)
        if tracked is not None and task.declared:
            root = Path(tracked).resolve()
            for f in source_files(task, data):
                if not f.resolve().is_relative_to(root):
                    raise DataError(
                        f"{f}: data.datasets.{name} reads a file outside {tracked}/, which prepare's DVC deps do not cover (DVC would not re-run on edits); copy it under {tracked}/ and point the path there"
                    )
        read_splits(task, data)  # the chat template is checked by prepare (it needs the tokenizer)
