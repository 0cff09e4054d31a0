"""``python -m pipeline.run``: validate params.yaml, then ``dvc repro`` offline, then print the summary.

* Validation happens first (every problem at once, exit 2, no traceback), so a bad file touches no output;
  then every task's data sources are read and checked (files, parsing, columns, labels: one message, exit 2).
* ``HF_HUB_OFFLINE=1`` is set in the environment of the whole pipeline unless the caller set it
  (``HF_HUB_OFFLINE=0 python -m pipeline.run`` lets a user with a hub resolve Hub ids).
* The interpreter's own ``bin/`` goes first on PATH so DVC's ``python -m stages.*`` commands
  run inside this virtual environment even when it is not activated.

* It opens an MLflow parent run (:mod:`pipeline.tracking.parent`) that every stage run of this repro nests
  under; the parent carries params.yaml, the summary table, the headline metrics and the list of
  stages, ``ran`` or ``cached`` (DVC skipped them; their run ids are the ones their outputs record), and the
  time table below. Tracking unreachable: a warning, and the pipeline runs without it.
* While DVC runs it prints ``stage k of N: <name>`` before each stage that runs, and it ends with where the
  time went: each stage's wall-clock seconds, ran or cached (:mod:`pipeline.repro`), after this command's own
  checks and DVC's start. ``--times FILE`` also writes that table as JSON (``bench/first_run.py`` reads it).

Extra arguments go to ``dvc repro`` (e.g. ``python -m pipeline.run -- --force``).

``--preset NAME`` merges ``pipeline/presets/NAME.yaml`` (a delta: only the keys it changes, as
nanoGPT's ``config/finetune_*.py``) over params.yaml, validates the result (every problem at once,
by dotted path, naming the preset file) and only then writes the changed keys into params.yaml
(its comments and the other keys stay), e.g. ``python -m pipeline.run --preset smollm2_gsm8k_cpu``.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the first row of the time table counts from here

import argparse  # noqa: E402
import json
import os
import sys
from pathlib import Path

from rich.table import Table

from pipeline.terminal.quiet import quiet

quiet()  # first: a train.plugins module, imported to validate, may import torch/peft/bitsandbytes

from pipeline import repro  # noqa: E402
from pipeline.config.load import load_params
from pipeline.config.presets import apply_preset
from pipeline.data.catalog import check as check_data
from pipeline.terminal.console import console, error, header
from pipeline.terminal.user_error import cli
from pipeline.tracking import parent
from pipeline.tracking.experiment import tracking_uri

CHECKS = "checks"  # the time table's first row: this command's own work before dvc (params, data, MLflow parent run)


def pipeline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", env["HF_HUB_OFFLINE"])
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def summary_table(summary: dict[str, dict]) -> Table:
    """The closing table of ``reports/summary.json`` (``task.method`` -> mean/std/seeds/step time).
    Fits 80 columns for every task x method name; a longer cell folds onto a second line, never cut."""
    table = Table(title="bilora summary (test split; mean ± std over seeds)")
    table.add_column("run", overflow="fold")
    table.add_column("metric", overflow="fold")
    for col in ("mean", "std", "seeds", "s/step"):
        table.add_column(col, justify="right", no_wrap=True)
    for key, row in summary.items():
        run = key + (f" (adapter of {row['adapter_from']})" if row.get("adapter_from") else "")
        table.add_row(
            run, row["main_metric"], f"{row['mean']:.4f}", f"{row['std']:.4f}", str(row["n_seeds"]), f"{row['median_step_time']:.3f}"
        )
    return table


def open_parent(params) -> str | None:
    """The parent run of this ``dvc repro`` (None when tracking is unreachable)."""
    from datetime import datetime

    name = "pipeline.run " + datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return parent.open_parent(tracking_uri(), params.tracking.experiment, name, {parent.ROLE_TAG: "run"}, "params.yaml")


def times_table(times: list[repro.StageTime]) -> Table:
    """Where the time went: each stage in the order DVC reached it (ran or cached), its wall-clock seconds and share."""
    total = sum(t.seconds for t in times) or 1.0
    table = Table(title="where the time went (wall clock)")
    table.add_column("stage", overflow="fold")
    table.add_column("", no_wrap=True)
    table.add_column("seconds", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    for t in times:
        table.add_row(t.stage, t.status, f"{t.seconds:.1f}", f"{100 * t.seconds / total:.0f} %")
    table.add_row("total", "", f"{total:.1f}", "100 %", end_section=True)
    return table


def dvc_repro(dvc_args: list[str], env: dict[str, str], total: int | None) -> tuple[int, list[repro.StageTime]]:
    """Run ``dvc repro`` with a progress line per stage (``stage k of total``); its exit code and each stage's seconds."""
    timeline = repro.Timeline(total)

    def note(line: str) -> None:
        console.print(f"[bold cyan]{line}[/]", soft_wrap=True)
        sys.stdout.flush()

    rc = repro.run([str(Path(sys.executable).parent / "dvc"), "repro", *dvc_args], env, timeline, note)
    return rc, timeline.times()


@cli
def main(argv: list[str] | None = None) -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file to validate (dvc reads params.yaml)")
    ap.add_argument(
        "--preset",
        default=None,
        help="merge pipeline/presets/PRESET.yaml (the keys it changes) over params.yaml, validate, write params.yaml, then run (e.g. smollm2_gsm8k_cpu)",
    )
    ap.add_argument("--times", type=Path, default=None, help="also write the time table (each stage's seconds) to this JSON file")
    ap.add_argument("dvc_args", nargs="*", help="extra arguments for dvc repro")
    args = ap.parse_args(argv)
    if args.preset:
        apply_preset(args.preset, args.params)
    params = load_params(args.params)
    check_data(params.data, tracked="data")  # before dvc: files exist, parse, columns and labels valid (DataError -> exit 2)
    evals = f" (+ {len(params.data.eval_tasks)} eval-only)" if params.data.eval_tasks else ""
    console.print(
        f"[green]params ok[/]: {len(params.data.tasks)} task(s){evals} x {len(params.train.methods)} method(s) x {len(params.train.seeds)} seed(s)"
    )
    env = pipeline_env()
    if not Path(".dvc").is_dir():
        error("no .dvc folder here: run from the repository root")
        sys.exit(2)
    header("dvc repro", " ".join(args.dvc_args))
    env.pop(parent.PARENT_ENV, None)  # the parent is this process's own, never inherited
    parent_id = open_parent(params)
    if parent_id is not None:
        env[parent.PARENT_ENV] = parent_id
    targets = [a for a in args.dvc_args if not a.startswith("-")]  # without targets DVC goes through the whole pipeline
    total = None if targets else repro.pipeline_stages()
    checks = repro.StageTime(CHECKS, "", time.monotonic() - STARTED)
    rc, times = dvc_repro(args.dvc_args, env, total)
    times = [checks, *times]
    if args.times is not None:
        args.times.write_text(json.dumps({"exit_code": rc, "stages": repro.as_rows(times)}, indent=2) + "\n")
    if parent_id is not None:
        parent.close_parent(
            tracking_uri(), parent_id, "FINISHED" if rc == 0 else "FAILED", ".", "params.yaml", stage_times=repro.as_rows(times)
        )
        console.print(f"MLflow parent run {parent_id}: every stage run of this repro is nested under it")
    if rc != 0:
        console.print(times_table(times))
        error(
            f"dvc repro failed (exit {rc}); fix the stage's error above and run again (finished stages are not re-run; training resumes from its checkpoint)"
        )
        sys.exit(rc)
    summary = Path("reports/summary.json")
    if summary.exists():
        console.print(summary_table(json.loads(summary.read_text())))
        console.print("Details: reports/report.md · MLflow UI: docs/tracking.md")
    console.print(times_table(times))


if __name__ == "__main__":
    main()
