"""reports/science/limited/report.md and results.json, rebuilt from the committed run summaries alone.

The analysis is the one reports/science/limited/PROTOCOL.md fixes. Primary, per task and Bi-LoRA arm
(:data:`limited.CONTRASTS`): the 16 paired differences arm − LoRA of the primary test metric (8 replicates
× 2 sizes, same subset and seed), a paired t interval, the two-sided t-test p-value and the TOST p-value
against ±SESOI, each Holm-adjusted over the 4 contrasts, and a paired bootstrap over replicates (within
size) × test examples. Secondary: the same per size, the trend against N with the first protocol's
full-data runs as a third point, train fit, the training-time diagnostics, step times. The calls are
computed only when every run of a contrast is in; the verdict is hand-written in ``verdict.md``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bilora.io import atomic_write_json, atomic_write_text
from pipeline.science import limited
from pipeline.science.stats import accuracy, holm, paired, paired_bootstrap, paired_t_p, pearson, tost

METRIC = {"mrpc": accuracy, "stsb": pearson}  # the primary metric from predictions (bootstrap)
FIRST = Path("reports/science/runs")  # the first protocol's full-data runs: the trend's third point
FIRST_ARM = {"bilora": "bilora"}  # limited arm -> first-protocol method with the same settings (rho 0.05, aux lr = lr)
VERDICT = "verdict.md"
DIAGNOSTICS = ("perturbation.relative_increase", "perturbation.alignment", "aux.relative_first_order_increase", "aux.projected_fraction")


def test_value(s: dict) -> float:
    return s["metrics"]["test"][limited.PRIMARY[s["task"]]]


def pairs(sums: dict[str, dict], task: str, arm: str, sizes: tuple[int, ...] = limited.SIZES) -> list[tuple[dict, dict]]:
    """(arm, LoRA) summaries of the same replicate and size, where both are in."""
    out = []
    for n in sizes:
        for r in range(limited.REPLICATES):
            a, b = (sums.get(limited.Run("sweep", task, m, n, r).name) for m in (arm, "lora"))
            if a and b:
                out.append((a, b))
    return out


def contrast(sums: dict[str, dict], task: str, arm: str, boot: bool) -> dict[str, Any]:
    ps = pairs(sums, task, arm)
    want = len(limited.SIZES) * limited.REPLICATES
    out: dict[str, Any] = {"task": task, "arm": arm, "n": len(ps), "complete": len(ps) == want}
    if len(ps) < 2:
        return out
    a, b = [test_value(x) for x, _ in ps], [test_value(y) for _, y in ps]
    d = [x - y for x, y in zip(a, b)]
    out |= {"t": paired(a, b).to_dict(), "p": paired_t_p(d), "tost_p": tost(d, limited.SESOI[task])}
    out["per_size"] = {
        n: paired(*zip(*[(test_value(x), test_value(y)) for x, y in pairs(sums, task, arm, (n,))])).to_dict()
        for n in limited.SIZES
        if len(pairs(sums, task, arm, (n,))) >= 2
    }
    if boot:
        labels = ps[0][0]["test_labels"]
        out["bootstrap"] = {
            k: v
            for k, v in paired_bootstrap(
                labels,
                [x["test_predictions"] for x, _ in ps],
                [y["test_predictions"] for _, y in ps],
                METRIC[task],
                [x["size"] for x, _ in ps],
            ).items()
            if k != "draws"
        }
    return out


def calls(rows: list[dict[str, Any]]) -> None:
    """Holm over the contrasts (only once all are complete), and the call each row gets (PROTOCOL.md)."""
    if not all(r["complete"] for r in rows):
        for r in rows:
            r["call"] = "pending (sweep incomplete)"
        return
    for r, hp, ht in zip(rows, holm([r["p"] for r in rows]), holm([r["tost_p"] for r in rows])):
        r["holm_p"], r["holm_tost_p"] = hp, ht
        if hp < limited.ALPHA:
            r["call"] = "Bi-LoRA better" if r["t"]["mean"] > 0 else "Bi-LoRA worse"
        elif ht < limited.ALPHA:
            r["call"] = f"equivalent within ±{limited.SESOI[r['task']]:g}"
        else:
            r["call"] = "unresolved"


def first_protocol(task: str, arm: str) -> dict | None:
    """The first protocol's full-data paired difference for the same settings (None if it has no such arm)."""
    method = FIRST_ARM.get(arm)
    if method is None or not FIRST.is_dir():
        return None
    runs = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in FIRST.glob(f"{task}-*.json")}
    seeds = sorted(int(k.rsplit("-", 1)[1]) for k in runs if k.startswith(f"{task}-{method}-"))
    ab = [(runs[f"{task}-{method}-{s}"], runs.get(f"{task}-lora-{s}")) for s in seeds]
    ab = [(x, y) for x, y in ab if y]
    if len(ab) < 2:
        return None
    return paired([test_value(x) for x, _ in ab], [test_value(y) for _, y in ab]).to_dict()


def cell_table(sums: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for task in limited.TASKS:
        for n in limited.SIZES:
            for arm in limited.ARMS:
                got = [sums[x] for r in range(limited.REPLICATES) if (x := limited.Run("sweep", task, arm, n, r).name) in sums]
                if not got:
                    continue
                diag = {
                    k: statistics.median(v)
                    for k in DIAGNOSTICS
                    if (v := [s["finetune"]["perturbation"][k] for s in got if k in (s["finetune"].get("perturbation") or {})])
                }
                rows.append(
                    {
                        "task": task,
                        "size": n,
                        "arm": arm,
                        "n": len(got),
                        "test": statistics.fmean(test_value(s) for s in got),
                        "train": statistics.fmean(s["metrics"]["train"][limited.PRIMARY[task]] for s in got),
                        "step_time": statistics.median(s["finetune"]["median_step_time"] for s in got),
                        "cpu": sorted({s["cpu"]["class"] for s in got}),
                        "diagnostics": diag,
                    }
                )
    return rows


def analyse(sums: dict[str, dict], boot: bool = True) -> dict[str, Any]:
    fit = [
        {
            "name": r.name,
            "steps": r.steps,
            "task": r.task,
            "train": sums[r.name]["metrics"]["train"][limited.PRIMARY[r.task]],
            "fits": sums[r.name]["metrics"]["train"][limited.PRIMARY[r.task]] >= limited.FIT[r.task],
        }
        for r in limited.fit_runs()
        if r.name in sums
    ]
    rows = [contrast(sums, t, a, boot) for t, a in limited.CONTRASTS]
    calls(rows)
    for r in rows:
        r["full_data"] = first_protocol(r["task"], r["arm"])
    done = sum(r.name in sums for r in limited.sweep_runs())
    return {"fit": fit, "runs_done": done, "runs_total": len(limited.sweep_runs()), "contrasts": rows, "cells": cell_table(sums)}


def pts(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.2f}"


def num(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.3g}"


def render(res: dict[str, Any], root: Path) -> str:
    L = [
        "# Second protocol: limited data (report)",
        "",
        "Rebuilt by `python -m pipeline.science.limited_sweep report` from `runs/*.json`; the protocol is [PROTOCOL.md](PROTOCOL.md).",
        f"Sweep: **{res['runs_done']} of {res['runs_total']}** runs summarised.",
        "",
        "## Fit phase (LoRA, replicate 0, N = 256): train metric on the whole training subset",
        "",
        "| steps | task | train | fits |",
        "|---|---|---|---|",
        *[f"| {f['steps']} | {f['task']} | {f['train']:.4f} | {'yes' if f['fits'] else 'no'} |" for f in res["fit"]],
        "",
        "## Primary: Bi-LoRA arm − LoRA, pooled over both sizes (points of the primary test metric)",
        "",
        "| task | arm | pairs | mean | 95 % t interval | p | Holm p | TOST p (±SESOI) | Holm TOST p | bootstrap 95 % (replicates × test examples) | call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["contrasts"]:
        t, b = r.get("t"), r.get("bootstrap")
        L.append(
            f"| {r['task']} | {r['arm']} | {r['n']} | {pts(t and t['mean'])} | "
            + (f"[{pts(t['low'])}, {pts(t['high'])}]" if t else "–")
            + f" | {num(r.get('p'))} | {num(r.get('holm_p'))} | {num(r.get('tost_p'))} | {num(r.get('holm_tost_p'))} | "
            + (f"[{pts(b['low'])}, {pts(b['high'])}]" if b else "–")
            + f" | {r['call']} |"
        )
    L += [
        "",
        "## Secondary: per size and against N (full data: the first protocol's 5 seeds, same settings)",
        "",
        "| task | arm | N = 256 | N = 1024 | full data |",
        "|---|---|---|---|---|",
    ]
    for r in res["contrasts"]:
        ps = r.get("per_size", {})
        cells = [f"{pts(ps[n]['mean'])} [{pts(ps[n]['low'])}, {pts(ps[n]['high'])}]" if n in ps else "–" for n in limited.SIZES]
        fd = r.get("full_data")
        full = f"{pts(fd['mean'])} [{pts(fd['low'])}, {pts(fd['high'])}] (n = {fd['n']})" if fd else "– (no such arm)"
        L.append(f"| {r['task']} | {r['arm']} | {cells[0]} | {cells[1]} | {full} |")
    L += [
        "",
        "## Cells: means over replicates, training-time diagnostics (second-half medians, median over runs)",
        "",
        "| task | N | arm | runs | test | train | rel. loss increase | alignment | aux first-order rel. | projected | s/step | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cells"]:
        dg = c["diagnostics"]
        f = lambda k: f"{dg[k]:.3g}" if k in dg else "–"  # noqa: E731
        L.append(
            f"| {c['task']} | {c['size']} | {c['arm']} | {c['n']} | {c['test']:.4f} | {c['train']:.4f} | {f(DIAGNOSTICS[0])} | {f(DIAGNOSTICS[1])} | {f(DIAGNOSTICS[2])} | {f(DIAGNOSTICS[3])} | {c['step_time']:.2f} | {', '.join(c['cpu'])} |"
        )
    verdict = root / VERDICT
    L += [
        "",
        "## Verdict",
        "",
        verdict.read_text(encoding="utf-8").strip() if verdict.is_file() else "Not written: the sweep is not complete.",
        "",
    ]
    return "\n".join(L)


def write(sums: dict[str, dict], root: Path, boot: bool = True) -> list[Path]:
    res = analyse(sums, boot)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "results.json", res)
    atomic_write_text(root / "report.md", render(res, root))
    return [root / "results.json", root / "report.md"]
