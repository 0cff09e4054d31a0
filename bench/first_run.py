"""A newcomer's first run, timed: README command 1 in a fresh clone, with a per-stage table in ``reports/first_run.md``.

    python -m bench.first_run                 # reuse this interpreter's virtual environment (no install)
    python -m bench.first_run --install       # the whole README command 1: venv + pip installs, then the pipeline
    python -m bench.first_run --dry-run       # clone, print what it would run, write nothing

It clones the committed state of this repository (``git clone``, so uncommitted changes are not measured)
into a temporary folder and runs README command 1 there: with ``--install`` the whole command (a new
``.venv``, ``pip install torch``, ``pip install -c constraints.txt -e .``), timed apart; without it, the
pipeline part only, ``python -m pipeline.run``, with this interpreter (the clone's code comes first on
``sys.path``). ``pipeline.run --times`` gives each stage's wall-clock seconds, ran or cached; the report
adds the machine, its CPU class (``avx512_bf16`` or AVX2-only: the classes the README's times are for),
the load averages before and after, and whether the run reproduced the committed figures
(``git diff`` of ``metrics/`` and ``reports/metrics.json`` in the clone). Run it on an otherwise quiet
machine; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine

ROOT = Path(__file__).resolve().parents[1]
README_INSTALL = (  # README command 1 before its pipeline part
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -c constraints.txt -e ."
)
FIGURES = ("metrics", "reports/metrics.json")  # what a run rewrites that the repository commits


def clone(source: Path, dest: Path) -> str:
    """``git clone`` of ``source``'s committed HEAD into ``dest``; the commit."""
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True)
    return subprocess.run(
        ["git", "-C", str(dest), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def pipeline_command(python: str, times: Path) -> list[str]:
    """README command 1's pipeline part, writing the time table to ``times``."""
    return [python, "-m", "pipeline.run", "--times", str(times)]


def figures_changed(repo: Path) -> list[str]:
    """The committed figures the run changed (``git diff --name-only``); empty: it reproduced them exactly."""
    r = subprocess.run(["git", "-C", str(repo), "diff", "--name-only", "--", *FIGURES], check=True, capture_output=True, text=True)
    return r.stdout.split()


def report(info: dict, times: dict) -> str:
    """The Markdown page: what ran where, the per-stage table, the totals."""
    rows = times["stages"]
    total = sum(r["seconds"] for r in rows)
    lines = [
        "# First run: README command 1 in a fresh clone",
        "",
        f"Command: `{info['command']}` (commit {info['commit']}, {info['date']}).",
        f"Machine: {info['machine']}; CPU class **{info['cpu_class']}**; load averages (1/5/15 min) {info['load_before']} before, "
        f"{info['load_after']} after.",
        f"Install: {info['install']}.",
        f"Pipeline (`python -m pipeline.run`): **{total:.0f} s** ({total / 60:.1f} min), exit code {times['exit_code']}; "
        + (
            "it reproduced the committed figures exactly."
            if not info["changed"]
            else f"figures that differ from the committed ones: {', '.join(info['changed'])}."
        ),
        "",
        "| stage | | seconds | share |",
        "|---|---|---:|---:|",
        *(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {100 * r['seconds'] / (total or 1):.0f} % |" for r in rows),
        f"| **total** | | **{total:.1f}** | 100 % |",
        "",
        "`checks`: `python -m pipeline.run` itself before DVC (params, data, MLflow parent run); `dvc start`: DVC up to",
        "the first stage; a stage's seconds run from DVC's line for it to the next stage's (its outputs cached included).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install", action="store_true", help="run README command 1 whole: a new .venv and the pip installs (timed)")
    ap.add_argument("--python", default=sys.executable, help="without --install: the interpreter to run the pipeline with")
    ap.add_argument("--source", type=Path, default=ROOT, help="the repository to clone (its committed HEAD)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "first_run.md", help="the report ('-': print only)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("--dry-run", action="store_true", help="clone and print the commands; run and write nothing")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds before the pipeline is stopped")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bilora-first-run-"))
    repo = work / "bilora"
    commit = clone(args.source, repo)
    python = str(repo / ".venv" / "bin" / "python") if args.install else args.python
    times_file = work / "times.json"
    cmd = pipeline_command(python, times_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "BILORA_"))} | {"PYTHONPATH": str(repo)}
    if args.dry_run:
        print(f"clone: {repo} (commit {commit})")
        if args.install:
            print(f"install: {README_INSTALL}")
        print("run: " + " ".join(cmd))
        shutil.rmtree(work, ignore_errors=True)
        return
    load_before = machine.load()
    install = f"not run (reused the environment of `{args.python}`)"
    if args.install:
        t0 = time.perf_counter()
        subprocess.run(README_INSTALL, shell=True, cwd=repo, env=env, check=True)  # noqa: S602 - the README's own command
        install = f"README command 1's installs, {time.perf_counter() - t0:.0f} s"
    try:
        subprocess.run(cmd, cwd=repo, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        sys.exit(f"the pipeline ran past --timeout {args.timeout} s; no report written (clone kept: {repo})")
    if not times_file.is_file():
        sys.exit(f"pipeline.run wrote no time table ({times_file}); no report written (clone kept: {repo})")
    times = json.loads(times_file.read_text())
    info = {
        "command": f"python -m bench.first_run{' --install' if args.install else ''}",
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "machine": machine.describe(),
        "cpu_class": machine.cpu_class(),
        "load_before": load_before,
        "load_after": machine.load(),
        "install": install,
        "changed": figures_changed(repo),
    }
    text = report(info, times)
    print(text)
    if str(args.out) != "-":
        args.out.write_text(text)
    if args.keep:
        print(f"clone kept: {repo}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
