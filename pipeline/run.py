"""``python -m pipeline.run``: validate params.yaml, then ``dvc repro`` offline, then print the summary.

* Validation happens first (every problem at once, exit 2, no traceback), so a bad file touches no output;
  then every task's data sources are read and checked (files, parsing, columns, labels: one message, exit 2).
* ``HF_HUB_OFFLINE=1`` is set in the environment of the whole pipeline unless the caller set it
  (``HF_HUB_OFFLINE=0 python -m pipeline.run`` lets a user with a hub resolve Hub ids).
* The interpreter's own ``bin/`` goes first on PATH so DVC's ``python -m stages.*`` commands
  run inside this virtual environment even when it is not activated.

Extra arguments go to ``dvc repro`` (e.g. ``python -m pipeline.run -- --force``).

``--preset NAME`` validates ``pipeline/presets/NAME.yaml`` (a complete params file) and then
**copies it over params.yaml** (the previous params.yaml is overwritten; it is tracked by git)
before running, e.g. ``python -m pipeline.run --preset smollm2_gsm8k_cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rich.table import Table

from pipeline.catalog import check as check_data
from pipeline.config import load_params
from pipeline.console import console, error, header
from pipeline.errors import cli
from pipeline.quiet import quiet


def pipeline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", env["HF_HUB_OFFLINE"])
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


PRESETS = Path(__file__).resolve().parent / "presets"


def apply_preset(name: str, params_path: str) -> None:
    """Validate ``pipeline/presets/<name>.yaml`` and copy it over ``params_path`` (nothing is written if invalid)."""
    from pipeline.errors import UserError

    src = PRESETS / f"{name}.yaml"
    if not src.is_file():
        known = sorted(f.stem for f in PRESETS.glob("*.yaml"))
        raise UserError(f"--preset {name!r}: no {src}; available presets: {known}")
    load_params(src)
    shutil.copyfile(src, params_path)
    console.print(f"[yellow]preset {name}[/]: copied {src.relative_to(PRESETS.parent.parent)} over {params_path}")


def summary_table(summary: dict[str, dict]) -> Table:
    """The closing table of ``reports/summary.json`` (``task.method`` -> mean/std/seeds/step time).
    Fits 80 columns for every task x method name; a longer cell folds onto a second line, never cut."""
    table = Table(title="bilora summary (test split; mean ± std over seeds)")
    table.add_column("run", overflow="fold")
    table.add_column("metric", overflow="fold")
    for col in ("mean", "std", "seeds", "s/step"):
        table.add_column(col, justify="right", no_wrap=True)
    for key, row in summary.items():
        table.add_row(key, row["main_metric"], f"{row['mean']:.4f}", f"{row['std']:.4f}", str(row["n_seeds"]), f"{row['median_step_time']:.3f}")
    return table


def dvc(*args: str, env: dict[str, str]) -> int:
    return subprocess.call([str(Path(sys.executable).parent / "dvc"), *args], env=env)


@cli
def main(argv: list[str] | None = None) -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file to validate (dvc reads params.yaml)")
    ap.add_argument("--preset", default=None, help="validate pipeline/presets/PRESET.yaml and COPY IT OVER params.yaml, then run (e.g. smollm2_gsm8k_cpu)")
    ap.add_argument("dvc_args", nargs="*", help="extra arguments for dvc repro")
    args = ap.parse_args(argv)
    if args.preset:
        apply_preset(args.preset, args.params)
    params = load_params(args.params)
    check_data(params.data, tracked="data")  # before dvc: files exist, parse, columns and labels valid (DataError -> exit 2)
    console.print(f"[green]params ok[/]: {len(params.data.tasks)} task(s) x {len(params.train.methods)} method(s) x {len(params.train.seeds)} seed(s)")
    env = pipeline_env()
    if not Path(".dvc").is_dir():
        error("no .dvc folder here: run from the repository root")
        sys.exit(2)
    header("dvc repro", " ".join(args.dvc_args))
    rc = dvc("repro", *args.dvc_args, env=env)
    if rc != 0:
        error(f"dvc repro failed (exit {rc}); fix the stage's error above and run again (finished stages are not re-run; training resumes from its checkpoint)")
        sys.exit(rc)
    summary = Path("reports/summary.json")
    if summary.exists():
        console.print(summary_table(json.loads(summary.read_text())))
        console.print("Details: reports/report.md · MLflow UI: see README ('Look at the runs')")


if __name__ == "__main__":
    main()
