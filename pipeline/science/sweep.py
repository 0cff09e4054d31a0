"""The resumable sweep of reports/science/PROTOCOL.md.

    python -m pipeline.science.sweep tune   [--rev REV] [--max-hours 2] [--commit]
    python -m pipeline.science.sweep run    [--rev REV] [--max-hours 2] [--commit]
    python -m pipeline.science.sweep status
    python -m pipeline.science.sweep report

Every run executes in a git worktree of one code revision (``--rev``, default ``protocol.CODE_REV``, the
commit the tag ``science-v2`` names), outside this checkout, whose
``params.yaml`` is the revision's own with ``pipeline/presets/science.yaml`` merged over it: this
checkout's ``params.yaml``, ``dvc.lock`` and ``metrics/`` are never touched. A run is
``dvc repro finetune@<run> evaluate@<run>`` there (through ``pipeline.run``, so data are checked and
MLflow runs are grouped), then its summary (metrics, history, sharpness, CPU, hash) is written to
``reports/science/runs/<name>.json`` here, and with ``--commit`` committed at once. The hash covers the
run's resolved settings, the data, base and eval sections, and the revision's code and data trees, so a
run whose file holds the same hash is skipped: the sweep continues on a fresh clone from git alone. The
settings are resolved by the revision's own code (:mod:`pipeline.science.pinned`, run in an extracted
tree of the revision), never by this checkout's schema: a later schema change leaves the hashes as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.terminal.quiet import quiet

quiet()  # before the imports below, which import torch/peft/bitsandbytes through the method registry

from bilora.io import atomic_write_json  # noqa: E402
from pipeline.terminal.console import console, error
from pipeline.terminal.user_error import UserError, cli
from pipeline.config.presets import deep_merge, preset_path
from pipeline.run import pipeline_env
from pipeline.science import pinned, protocol
from pipeline.science.protocol import Run

ROOT = Path("reports/science")
RUNS = ROOT / "runs"
ADAPTERS = ROOT / "adapters"
CODE = ("bilora", "pipeline", "stages", "data", "dvc.yaml", "pyproject.toml", "constraints.txt")
NOT_CODE = ("pipeline/science/", "pipeline/presets/")  # the sweep itself and the presets (their keys enter as params)
PACKAGES = ("bilora", "pipeline", "stages")  # what pinned.py imports from a revision's tree
_RESOLVED: dict[str, dict[str, Any]] = {}  # request key -> {"hash", "settings"}: one subprocess per new batch


def git(*args: str, cwd: str | Path = ".") -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def code_identity(rev: str) -> dict[str, str]:
    """The commit of ``rev`` and one digest of every code and data file in it (blob ids, so content only)."""
    listing = [
        line for line in git("ls-tree", "-r", rev, "--", *CODE).splitlines() if not line.split("\t", 1)[1].startswith(NOT_CODE)
    ]  # "<mode> blob <sha>\t<path>"
    return {"commit": git("rev-parse", f"{rev}^{{commit}}"), "tree": hashlib.sha256("\n".join(listing).encode()).hexdigest()}


def run_params(default: dict, run: Run) -> dict:
    """The workspace's params.yaml as a mapping: the revision's params.yaml + the preset (+ a tuning run's lr)."""
    from pipeline.config.load import read_yaml

    p = deep_merge(default, read_yaml(preset_path(protocol.PRESET)) or {})
    if run.phase == "tune":
        p = deep_merge(
            p,
            {
                "train": {"methods": ["lora"], "seeds": [run.seed], "loop": {"lr": run.lr}},
                "merge": {"method": "lora", "seed": run.seed},
                "eval": {"sharpness": {"enabled": False}},  # the lr is chosen on validation accuracy alone
            },
        )
    return p


def extract(commit: str, dest: Path) -> Path:
    """The revision's Python packages (:data:`PACKAGES`, from git's objects: no worktree, nothing local) under ``dest``."""
    present = [p for p in PACKAGES if p in git("ls-tree", "--name-only", commit).splitlines()]
    tar = subprocess.run(["git", "archive", "--format=tar", commit, "--", *present], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return dest


def resolve(items: list[tuple[Any, dict]], code: dict[str, str], preset: str = protocol.PRESET) -> list[dict[str, Any]]:
    """Each run's ``{"hash", "settings"}``: its raw params (the workspace's params.yaml) validated and resolved
    by the code of ``code["commit"]``, hashed with ``code["tree"]`` (:mod:`pipeline.science.pinned`). A run is
    anything with ``task``, ``method`` and ``seed`` (this protocol's :class:`Run` or another protocol's)."""
    keys = [json.dumps([code, run.task, run.method, run.seed, params], sort_keys=True) for run, params in items]
    todo = {k: (run, params) for k, (run, params) in zip(keys, items) if k not in _RESOLVED}
    if todo:
        source = f"{preset_path(preset)} (merged over params.yaml of {code['commit'][:10]})"
        request = {
            "tree": code["tree"],
            "runs": [{"task": r.task, "method": r.method, "seed": r.seed, "params": p, "source": source} for r, p in todo.values()],
        }
        with tempfile.TemporaryDirectory(prefix="bilora-pinned-") as tmp:
            tree, out = extract(code["commit"], Path(tmp) / "tree"), Path(tmp) / "resolved.json"
            env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
            proc = subprocess.run(
                [sys.executable, "-c", Path(pinned.__file__).read_text(encoding="utf-8"), str(out)],
                cwd=tree,
                env=env,
                input=json.dumps(request),
                capture_output=True,
                text=True,
            )
            answer = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {"error": proc.stderr.strip()[-2000:]}
        if proc.returncode != 0 or "error" in answer:
            raise UserError(f"resolving the science runs with the code of {code['commit'][:10]}: {answer.get('error')}")
        _RESOLVED.update(zip(todo, answer))
    return [_RESOLVED[k] for k in keys]


def run_hash(run: Run, params: dict, code: dict[str, str]) -> str:
    """sha256 of what determines the run's numbers at ``code["commit"]``: its resolved settings, data/base/eval
    sections (resolved from the raw ``params`` by that revision's code), and the code digest."""
    return resolve([(run, params)], code)[0]["hash"]


def done(run: Run, h: str) -> bool:
    f = RUNS / f"{run.name}.json"
    return f.is_file() and json.loads(f.read_text(encoding="utf-8")).get("hash") == h


def cpu() -> dict[str, Any]:
    """Model name, core count and the flags that decide the CPU class (avx512_bf16 or avx2-only)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), platform.processor())
    flags = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
    has = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "flags": has, "class": "avx512_bf16" if "avx512_bf16" in flags else "avx2"}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "dvc")}


def workspace(path: Path, rev: str) -> Path:
    """A detached worktree of ``rev`` at ``path`` (created once; an existing one must be at ``rev``)."""
    want = git("rev-parse", f"{rev}^{{commit}}")
    if not path.exists():
        git("worktree", "add", "--detach", str(path), want)
    elif git("rev-parse", "HEAD", cwd=path) != want:
        raise UserError(
            f"{path}: a worktree at another commit than {rev} ({want[:10]}); remove it (git worktree remove {path}) or pass --workspace"
        )
    return path


def execute(run: Any, ws: Path, params: dict) -> tuple[float, list[float]]:
    """``dvc repro`` of the run's finetune and evaluate stages in the workspace; returns the wall time and the
    1-min load average sampled every 10 s while it ran."""
    import yaml

    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    stem = f"{run.task}-{run.method}-{run.seed}"
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.run", f"finetune@{stem}", f"evaluate@{stem}"], cwd=ws, env=pipeline_env())
    while proc.poll() is None:
        time.sleep(10)
        loads.append(os.getloadavg()[0])
    rc = proc.returncode
    if rc != 0:
        raise UserError(
            f"{run.name}: dvc repro failed in {ws} (exit {rc}); see its output above. Finished runs are kept; run the sweep again to continue"
        )
    return time.perf_counter() - start, loads


def summarise(run: Run, ws: Path, h: str, code: dict[str, str], wall: float, load: list[float], params: dict) -> dict[str, Any]:
    resolved = resolve([(run, params)], code)[0]  # cached: pending() resolved it before the run
    stem = f"{run.task}-{run.method}-{run.seed}"

    def read(rel: str) -> Any:
        return json.loads((ws / rel).read_text(encoding="utf-8"))

    return {
        "name": run.name,
        "phase": run.phase,
        "task": run.task,
        "method": run.method,
        "seed": run.seed,
        "lr": getattr(run, "lr", None),
        "hash": h,
        "code": code,
        "cpu": cpu(),
        "wall_s": wall,
        "load_avg": load,  # 1-min load average every 10 s of the run: step times under load are not comparable
        "versions": versions(),
        "settings": resolved["settings"],  # what the hash covers, resolved by the revision's code
        "params": params,  # the workspace's whole params.yaml for this run
        "metrics": read(f"artifacts/eval/{stem}/metrics.json"),  # full precision, every split
        "sharpness": read(f"artifacts/eval/{stem}/sharpness.json") if (ws / f"artifacts/eval/{stem}/sharpness.json").is_file() else None,
        "finetune": read(f"artifacts/finetune/{stem}/summary.json"),
        "history": read(f"artifacts/finetune/{stem}/history.json"),
        "data_stats": read("artifacts/data/stats.json").get(run.task),
    }


def save_adapter(run: Any, ws: Path, root: Path = ADAPTERS) -> Path:
    """The primary adapter in PEFT's format, its tensors cast to bf16 (``root``/<run>/, default reports/science/adapters/)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = ws / f"artifacts/finetune/{run.task}-{run.method}-{run.seed}/adapter"
    out = root / run.name
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(
        tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt", "dtype": "bfloat16 (cast from the float32 adapter)"}
    )
    shutil.copy(src / "adapter_config.json", out / "adapter_config.json")
    return out


def tuned_lr(expected: dict[str, str] | None = None) -> float | None:
    """The learning rate with the best validation primary metric averaged over the tasks (ties: the smaller);
    None until every tuning run is summarised (with its ``expected`` hash, when given)."""
    scores: dict[float, list[float]] = {}
    for run in protocol.tune_runs():
        f = RUNS / f"{run.name}.json"
        if not f.is_file():
            return None
        s = json.loads(f.read_text(encoding="utf-8"))
        if expected is not None and s.get("hash") != expected[run.name]:
            return None
        scores.setdefault(run.lr, []).append(s["metrics"]["validation"][protocol.PRIMARY[run.task]])
    return max(sorted(scores), key=lambda lr: sum(scores[lr]) / len(scores[lr]))  # max keeps the first (smallest) of ties


def expected(rev: str) -> dict[str, str]:
    """Run name -> the hash every protocol run (tuning and sweep) has at ``rev`` with the current preset."""
    import yaml

    code = code_identity(rev)
    default = yaml.safe_load(git("show", f"{rev}:params.yaml"))
    return {r.name: h for r, _, h in pending(protocol.tune_runs() + protocol.sweep_runs(), default, code, skip_done=False)}


def pending(runs: list[Run], default: dict, code: dict[str, str], skip_done: bool = True) -> list[tuple[Run, dict, str]]:
    merged = [run_params(default, run) for run in runs]
    hashes = [r["hash"] for r in resolve(list(zip(runs, merged)), code)]
    return [(run, p, h) for run, p, h in zip(runs, merged, hashes) if not (skip_done and done(run, h))]


def sweep(phase: str, rev: str, ws_path: Path, max_hours: float, commit: bool) -> None:
    import yaml

    if git("status", "--porcelain", "--", str(preset_path(protocol.PRESET))):
        raise UserError(f"{preset_path(protocol.PRESET)} has uncommitted changes: commit it first (the runs must be reproducible from git)")
    code = code_identity(rev)
    default = yaml.safe_load(git("show", f"{rev}:params.yaml"))
    runs = protocol.tune_runs() if phase == "tune" else protocol.sweep_runs()
    if phase == "run":
        lr, preset_lr = tuned_lr(expected(rev)), run_params(default, runs[0])["train"]["loop"]["lr"]
        if lr is None:
            raise UserError("the learning rate is not tuned yet: run `python -m pipeline.science.sweep tune` first")
        if lr != preset_lr:
            raise UserError(
                f"pipeline/presets/science.yaml: train.loop.lr is {preset_lr:g}, the tuning chose {lr:g}; set it and commit the preset"
            )
    todo = pending(runs, default, code)
    console.print(f"[bold]science {phase}[/]: {len(runs) - len(todo)} of {len(runs)} runs done at {code['commit'][:10]}; {len(todo)} to go")
    if not todo:
        return
    ws = workspace(ws_path, rev)
    start = time.perf_counter()
    for run, merged, h in todo:
        if time.perf_counter() - start > max_hours * 3600:
            console.print(f"[yellow]--max-hours {max_hours:g} reached[/]: stopping before {run.name}; run again to continue")
            return
        console.rule(f"science {run.name}")
        wall, load = execute(run, ws, merged)
        RUNS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RUNS / f"{run.name}.json", summarise(run, ws, h, code, wall, load, merged))
        paths = [str(RUNS / f"{run.name}.json")]
        if run.phase == "sweep" and run.task == "mrpc" and run.method in protocol.ADAPTERS:
            paths.append(str(save_adapter(run, ws)))
        from pipeline.science import report

        paths += [str(p) for p in report.write(RUNS, ROOT, expected(rev))]
        if commit:
            git("add", "--", *paths)
            git("commit", "-q", "-m", f"science: {run.name} ({wall / 60:.1f} min, {code['commit'][:10]})", "--", *paths)
        console.print(f"[green]{run.name}[/]: {wall / 60:.1f} min")


def status(rev: str) -> None:
    want = expected(rev)
    for phase, runs in (("tune", protocol.tune_runs()), ("sweep", protocol.sweep_runs())):
        have = [r for r in runs if done(r, want[r.name])]
        console.print(f"{phase}: {len(have)} of {len(runs)} summarised with the hash of {rev} and the current preset")
    console.print(f"tuned lr: {tuned_lr(want)}")


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("tune", "run", "status", "report"))
    ap.add_argument(
        "--rev",
        default=protocol.CODE_REV,
        help=f"the code revision every run uses (default {protocol.CODE_TAG} = {protocol.CODE_REV[:10]})",
    )
    ap.add_argument("--workspace", type=Path, default=None, help="the worktree the runs execute in (default ../bilora-science-<commit>)")
    ap.add_argument("--max-hours", type=float, default=2.0, help="start no new run after this many hours (default 2)")
    ap.add_argument("--commit", action="store_true", help="commit each run's summary (and report) as soon as it is written")
    args = ap.parse_args(argv)
    os.chdir(git("rev-parse", "--show-toplevel"))  # RUNS, the preset and git paths are relative to the checkout's root
    if args.phase == "status":
        return status(args.rev)
    if args.phase == "report":
        from pipeline.science import report

        for p in report.write(RUNS, ROOT, expected(args.rev)):
            console.print(f"wrote {p}")
        return None
    ws = args.workspace or Path("..").resolve() / f"bilora-science-{git('rev-parse', '--short=10', args.rev + '^{commit}')}"
    exit_on_git_error(lambda: sweep(args.phase, args.rev, ws, args.max_hours, args.commit))
    return None


def exit_on_git_error(call: Any) -> None:
    """Run ``call()``; a failed git command is a user-facing error (its stderr, exit 2), not a traceback."""
    try:
        call()
    except subprocess.CalledProcessError as e:
        error(f"git {' '.join(e.cmd[1:])}: {e.stderr.strip()}")
        sys.exit(2)


if __name__ == "__main__":
    main()
