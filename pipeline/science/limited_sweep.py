"""The resumable sweep of reports/science/limited/PROTOCOL.md (second protocol: limited data).

    python -m pipeline.science.limited_sweep fit    [--rev REV] [--max-hours 2] [--commit]
    python -m pipeline.science.limited_sweep run    [--rev REV] [--max-hours 2] [--commit]
    python -m pipeline.science.limited_sweep status
    python -m pipeline.science.limited_sweep report

The same machinery as the first protocol (:mod:`pipeline.science.sweep`): every run is ``dvc repro
finetune@<run> evaluate@<run>`` in a git worktree of one code revision (``--rev``, default
``limited.CODE_REV``) whose ``params.yaml`` is the revision's own with
``pipeline/presets/science_limited.yaml`` and the run's size, subset seed and training seed merged over
it; its summary goes to ``reports/science/limited/runs/<name>.json`` with a hash of the resolved settings
and the code, so a run already summarised with the same hash is skipped and the sweep continues from git
alone. This checkout's ``params.yaml``, ``dvc.lock`` and ``metrics/`` are never touched.

``fit`` runs LoRA (replicate 0, N = 256) at each step count of ``limited.FIT_STEPS`` in turn, both tasks,
and stops at the first count that fits both (``limited.FIT``); ``run`` refuses to start until the preset's
``train.loop.max_steps`` equals that count. Summaries add the test predictions and labels (for the paired
bootstrap over test examples) and the replicate's subset; MRPC adapters are kept with their row indices.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.terminal.quiet import quiet

quiet()

from bilora.io import atomic_write_json  # noqa: E402
from pipeline.config.presets import deep_merge, preset_path  # noqa: E402
from pipeline.science import limited, sweep  # noqa: E402
from pipeline.science.limited import Run  # noqa: E402
from pipeline.terminal.console import console  # noqa: E402
from pipeline.terminal.user_error import UserError, cli  # noqa: E402

ROOT = Path("reports/science/limited")
RUNS = ROOT / "runs"
ADAPTERS = ROOT / "adapters"
PHASES = {"fit": limited.fit_runs, "run": limited.sweep_runs}


def preset() -> dict:
    from pipeline.config.load import read_yaml

    return read_yaml(preset_path(limited.PRESET)) or {}


def run_params(default: dict, run: Run) -> dict:
    """The workspace's params.yaml: the revision's params.yaml + the preset + the run's arm, size and seeds."""
    # deep_merge replaces a value by an empty mapping: the sweep's runs must not pass ``"loop": {}``
    loop: dict[str, Any] = {"loop": {"max_steps": run.steps}} if run.phase == "fit" else {}
    return deep_merge(
        deep_merge(default, preset()),
        {
            "data": {
                "tasks": [run.task],
                "train_subset": limited.drawn(run.size),
                "val_fraction": limited.VAL_FRACTION,
                "split_seed": limited.split_seed(run.size, run.replicate),
            },
            "train": {"methods": [run.method], "seeds": [run.seed], **loop},
            "eval": {"train_subset": run.size},  # score the whole training subset: the fit check
            "merge": {"task": run.task, "method": run.method, "seed": run.seed},
        },
    )


def pending(runs: list[Run], default: dict, code: dict[str, str], skip_done: bool = True) -> list[tuple[Run, dict, str]]:
    merged = [run_params(default, r) for r in runs]
    hashes = [x["hash"] for x in sweep.resolve(list(zip(runs, merged)), code, limited.PRESET)]
    return [(r, p, h) for r, p, h in zip(runs, merged, hashes) if not (skip_done and done(r, h))]


def done(run: Run, h: str) -> bool:
    f = RUNS / f"{run.name}.json"
    return f.is_file() and json.loads(f.read_text(encoding="utf-8")).get("hash") == h


def expected(rev: str) -> dict[str, str]:
    """Run name -> the hash every protocol run (fit and sweep) has at ``rev`` with the current preset."""
    import yaml

    code = sweep.code_identity(rev)
    default = yaml.safe_load(sweep.git("show", f"{rev}:params.yaml"))
    return {r.name: h for r, _, h in pending(limited.fit_runs() + limited.sweep_runs(), default, code, skip_done=False)}


def train_fit(summary: dict) -> float:
    """The fit check's number: the primary metric on the whole training subset."""
    return summary["metrics"]["train"][limited.PRIMARY[summary["task"]]]


def fitted_steps(summaries: dict[str, dict]) -> int | None:
    """The smallest step count of FIT_STEPS whose fit runs fit both tasks; None while a smaller count's runs are
    missing from ``summaries`` (run name -> summary). Raises when every count ran and none fits."""
    for steps in limited.FIT_STEPS:
        runs = [r for r in limited.fit_runs() if r.steps == steps]
        if steps in excluded(summaries):
            continue
        if any(r.name not in summaries for r in runs):
            return None
        if all(train_fit(summaries[r.name]) >= limited.FIT[r.task] for r in runs):
            return steps
    raise UserError(
        f"no step budget of {limited.FIT_STEPS} fits LoRA at N = {limited.FIT_SIZE} on both tasks ({limited.FIT}): "
        "the protocol's fit rule fails; amend PROTOCOL.md (a new revision) before any sweep run"
    )


def excluded(summaries: dict[str, dict]) -> set[int]:
    """Step counts already ruled out: a task's fit run at that count is in and does not fit."""
    return {r.steps for r in limited.fit_runs() if r.name in summaries and train_fit(summaries[r.name]) < limited.FIT[r.task]}


def summaries(want: dict[str, str] | None = None) -> dict[str, dict]:
    """Committed summaries by name (only those whose hash is ``want``'s, when given)."""
    out = {}
    for f in sorted(RUNS.glob("*.json")) if RUNS.is_dir() else []:
        s = json.loads(f.read_text(encoding="utf-8"))
        if want is None or want.get(s["name"]) == s.get("hash"):
            out[s["name"]] = s
    return out


def subset(run: Run, n_rows: int) -> dict[str, Any]:
    """The replicate's rows of the train file, as prepare drew them (0-based data-row indices)."""
    from types import SimpleNamespace

    from pipeline.data.prepare import split_indices

    cfg = SimpleNamespace(
        split_seed=limited.split_seed(run.size, run.replicate), train_subset=limited.drawn(run.size), val_fraction=limited.VAL_FRACTION
    )
    train, val = split_indices(n_rows, cfg)
    return {
        "split_seed": cfg.split_seed,
        "train_subset": cfg.train_subset,
        "val_fraction": cfg.val_fraction,
        "train_file_rows": n_rows,
        "train_rows": train,
        "validation_rows": val,
        "how": "pipeline.data.prepare.split_indices(train_file_rows, data config): 0-based indices of the train file's data rows",
    }


def summarise(run: Run, ws: Path, h: str, code: dict[str, str], wall: float, load: list[float], params: dict) -> dict[str, Any]:
    from datasets import load_from_disk

    s = sweep.summarise(run, ws, h, code, wall, load, params)
    stem = f"{run.task}-{run.method}-{run.seed}"
    s |= {
        "size": run.size,
        "replicate": run.replicate,
        "steps": run.steps,
        "subset": subset(run, s["data_stats"]["train_file_rows"]),
        "test_predictions": json.loads((ws / f"artifacts/eval/{stem}/predictions_test.json").read_text(encoding="utf-8")),
        "test_labels": [float(y) for y in load_from_disk(str(ws / "artifacts/data" / run.task))["test"]["labels"]],
    }
    if len(s["subset"]["train_rows"]) != run.size or s["data_stats"]["rows"]["train"] != run.size:
        raise UserError(f"{run.name}: trained on {s['data_stats']['rows']['train']} rows, the protocol says {run.size}")
    return s


def check_budget(rev: str, want: dict[str, str]) -> None:
    steps = fitted_steps(summaries(want))
    if steps is None:
        raise UserError("the step budget is not fixed yet: run `python -m pipeline.science.limited_sweep fit` first")
    have = preset().get("train", {}).get("loop", {}).get("max_steps")
    if have != steps:
        raise UserError(
            f"{preset_path(limited.PRESET)}: train.loop.max_steps is {have}, the fit phase chose {steps}; set it and commit the preset"
        )


def sweep_phase(phase: str, rev: str, ws_path: Path, max_hours: float, commit: bool) -> None:
    import yaml

    if sweep.git("status", "--porcelain", "--", str(preset_path(limited.PRESET))):
        raise UserError(f"{preset_path(limited.PRESET)} has uncommitted changes: commit it first (the runs must be reproducible from git)")
    code = sweep.code_identity(rev)
    default = yaml.safe_load(sweep.git("show", f"{rev}:params.yaml"))
    want = expected(rev)
    if phase == "run":
        check_budget(rev, want)
    todo = pending(PHASES[phase](), default, code)
    console.print(
        f"[bold]limited {phase}[/]: {len(PHASES[phase]()) - len(todo)} of {len(PHASES[phase]())} runs done at {code['commit'][:10]}"
    )
    ws = sweep.workspace(ws_path, rev) if todo else None
    start = time.perf_counter()
    for run, merged, h in todo:
        if phase == "fit" and fitted_steps(summaries(want)) is not None:
            break  # a smaller budget already fits both tasks
        if phase == "fit" and run.steps in excluded(summaries(want)):
            console.print(f"skip {run.name}: another task does not fit at {run.steps} steps, so this budget cannot be chosen")
            continue
        if time.perf_counter() - start > max_hours * 3600:
            console.print(f"[yellow]--max-hours {max_hours:g} reached[/]: stopping before {run.name}; run again to continue")
            return
        console.rule(f"limited {run.name}")
        wall, load = sweep.execute(run, ws, merged)
        RUNS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RUNS / f"{run.name}.json", summarise(run, ws, h, code, wall, load, merged))
        paths = [str(RUNS / f"{run.name}.json")]
        if run.phase == "sweep" and run.task == limited.ADAPTER_TASK:
            out = sweep.save_adapter(run, ws, ADAPTERS)
            atomic_write_json(
                out / "subset.json", subset(run, json.loads((RUNS / f"{run.name}.json").read_text())["subset"]["train_file_rows"])
            )
            paths.append(str(out))
        paths += [str(p) for p in write_report(want)]
        if commit:
            sweep.git("add", "--", *paths)
            sweep.git("commit", "-q", "-m", f"science limited: {run.name} ({wall / 60:.1f} min, {code['commit'][:10]})", "--", *paths)
        console.print(f"[green]{run.name}[/]: {wall / 60:.1f} min")
    if phase == "fit":
        console.print(f"fit phase: step budget {fitted_steps(summaries(want))}")


def write_report(want: dict[str, str]) -> list[Path]:
    from pipeline.science import limited_report

    return limited_report.write(summaries(want), ROOT)


def status(rev: str) -> None:
    want = expected(rev)
    have = summaries(want)
    for phase, runs in PHASES.items():
        console.print(
            f"{phase}: {sum(r.name in have for r in runs())} of {len(runs())} summarised with the hash of {rev[:10]} and the current preset"
        )
    console.print(f"step budget chosen by the fit phase: {fitted_steps(have)}")


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("fit", "run", "status", "report"))
    ap.add_argument("--rev", default=limited.CODE_REV or "HEAD", help=f"the code revision every run uses (default {limited.CODE_TAG})")
    ap.add_argument("--workspace", type=Path, default=None, help="the worktree the runs execute in (default ../bilora-limited-<commit>)")
    ap.add_argument("--max-hours", type=float, default=2.0, help="start no new run after this many hours (default 2)")
    ap.add_argument("--commit", action="store_true", help="commit each run's summary (and report) as soon as it is written")
    args = ap.parse_args(argv)
    os.chdir(sweep.git("rev-parse", "--show-toplevel"))
    rev = sweep.git("rev-parse", f"{args.rev}^{{commit}}")
    if args.phase == "status":
        return status(rev)
    if args.phase == "report":
        for p in write_report(expected(rev)):
            console.print(f"wrote {p}")
        return None
    ws = args.workspace or Path("..").resolve() / f"bilora-limited-{rev[:10]}"
    sweep.exit_on_git_error(lambda: sweep_phase(args.phase, rev, ws, args.max_hours, args.commit))
    return None


if __name__ == "__main__":
    main()
