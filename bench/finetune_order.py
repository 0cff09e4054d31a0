"""Why the default run's LoRA fine-tune takes longer than Bi-LoRA's: a first-stage cost, or the steps themselves?

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.finetune_order --workspace DIR [--rounds 2]

``DIR`` is a checkout after ``dvc repro`` of the default pipeline (``python -m bench.first_run --keep`` leaves one).
Each round re-runs both fine-tune stages of the default run with ``dvc repro -f -s`` (the stage exactly as the
pipeline runs it: a new process, its imports, model load, training, logging), Bi-LoRA first in odd rounds and
LoRA first in even ones, so neither method always runs first or on a warmer machine. Per stage run it records
the wall clock of the whole ``dvc repro`` and, from the stage's ``summary.json``, the training steps, the median
step time and the time the training process ran. Every round runs warm (the workspace has run before), so a
per-step cost shows as the median step times differing in every round, and a first-run cost (cold page cache, a
new environment's first imports) as the first run's stage (``reports/first_run.md``, best with ``--install``)
being slower than the same stage here. Writes ``reports/finetune_order.md``. Run it on an otherwise quiet machine; it is a
benchmark, not a test. The stages' outputs are rewritten with the same bytes (same params and seed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import machine
from pipeline.run import pipeline_env

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("sst2-lora-0", "sst2-bilora-0")  # the default run's two fine-tunes


def order(rounds: int) -> list[str]:
    """The stage runs, in order: Bi-LoRA first in odd rounds (1, 3, ...), LoRA first in even ones."""
    lora, bilora = RUNS
    return [name for r in range(1, rounds + 1) for name in ((bilora, lora) if r % 2 else (lora, bilora))]


def run_stage(workspace: Path, name: str) -> dict:
    """``dvc repro -f -s finetune@<name>`` in ``workspace``: its wall clock and the stage's own summary figures."""
    dvc = str(Path(sys.executable).parent / "dvc")
    env = pipeline_env() | {"PYTHONPATH": str(workspace)}  # offline; this interpreter's bin first on PATH, as pipeline.run
    t0 = time.perf_counter()
    subprocess.run([dvc, "repro", "-f", "-s", f"finetune@{name}"], cwd=workspace, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    s = json.loads((workspace / "artifacts" / "finetune" / name / "summary.json").read_text())
    return {
        "run": name,
        "wall_s": wall,
        "steps": s["steps"],
        "median_step_s": s["median_step_time"],
        "train_process_s": s["wall_time_this_process"],
    }


def report(info: dict, rows: list[dict]) -> str:
    """The Markdown page: each stage run in order, then per method the means and LoRA minus Bi-LoRA."""
    lora, bilora = RUNS
    by = {n: [r for r in rows if r["run"] == n] for n in RUNS}
    keys = ("wall_s", "train_process_s", "median_step_s")
    mean = {n: {k: statistics.fmean(r[k] for r in by[n]) for k in keys} for n in RUNS}
    steps = by[lora][0]["steps"]
    gap = {k: mean[lora][k] - mean[bilora][k] for k in keys}
    lines = [
        "# LoRA's fine-tune against Bi-LoRA's in the default run",
        "",
        f"Command: `{info['command']}` (commit {info['commit']}, {info['date']}).",
        f"Machine: {info['machine']}; load averages (1/5/15 min) {info['load_before']} before, {info['load_after']} after.",
        "Each row is one `dvc repro -f -s finetune@<run>` (a new stage process, as the pipeline runs it); rounds alternate which method goes first.",
        "`training process s` is the training loop's own wall clock (`wall_time_this_process` in the stage's summary.json).",
        "",
        "| # | stage | wall s | steps | training process s | mean s/step | median s/step |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *(
            f"| {i} | finetune@{r['run']} | {r['wall_s']:.1f} | {r['steps']} | {r['train_process_s']:.1f} | "
            f"{r['train_process_s'] / r['steps']:.3f} | {r['median_step_s']:.3f} |"
            for i, r in enumerate(rows, 1)
        ),
        "",
        "| method | runs | mean wall s | mean training process s | mean median s/step |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {n} | {len(by[n])} | {mean[n]['wall_s']:.1f} | {mean[n]['train_process_s']:.1f} | {mean[n]['median_step_s']:.3f} |"
            for n in RUNS
        ),
        "",
        f"LoRA minus Bi-LoRA: stage wall {gap['wall_s']:+.1f} s, training process {gap['train_process_s']:+.1f} s, "
        f"{steps} steps × median step time {steps * gap['median_step_s']:+.1f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.finetune_order", description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, required=True, help="a checkout after dvc repro of the default pipeline")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both stages (default 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "finetune_order.md", help="the report ('-': print only)")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(args.workspace), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True)
    load_before = machine.load()
    rows = []
    for name in order(args.rounds):
        rows.append(run_stage(args.workspace, name))
        print(f"{name}: {rows[-1]['wall_s']:.1f} s, median {rows[-1]['median_step_s']:.3f} s/step", flush=True)
    info = {
        "command": f"python -m bench.finetune_order --rounds {args.rounds}",
        "commit": commit.stdout.strip(),
        "date": datetime.date.today().isoformat(),
        "machine": machine.describe(),
        "load_before": load_before,
        "load_after": machine.load(),
    }
    text = report(info, rows)
    print(text)
    if str(args.out) != "-":
        args.out.write_text(text)


if __name__ == "__main__":
    main()
