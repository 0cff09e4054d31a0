"""reports/science/report.md and results.json, rebuilt from the committed run summaries alone.

Everything here reads ``reports/science/runs/*.json`` (written by :mod:`pipeline.science.sweep`);
nothing needs the workspace, DVC or MLflow. The analysis is the one PROTOCOL.md fixes: per task and
compared run, the primary test metric's mean ± std over seeds and its paired difference against
LoRA (same seed) with a 95 % Student-t interval; a difference is called real when that interval
excludes 0. The same for the flatness figures (loss increase under the projected attack, the
one-step attack and random directions, at each global radius), train–test gaps and step times.

The pre-registered calls (H1, H2) are computed here from that rule; the verdict that reads them is written
by hand into ``reports/science/verdict.md`` once the sweep is complete, and included in report.md as is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bilora.io import atomic_write_json, atomic_write_text
from pipeline.science import exploratory, protocol
from pipeline.science.stats import paired, power

PAPER_DIRECTION = (
    "The paper's direction (docs/methods.md, T5-base): Bi-LoRA above LoRA by +0.82 points on MRPC (Table A2, 89.38 vs 88.56) "
    "and +0.51 on RTE (Table A3, 83.61 vs 83.10; STS-B is not in the paper's tables), with LoRA-SAM in between; no flatness numbers at a stated radius."
)
# The paper's gain of Bi-LoRA over LoRA on a task of this protocol (T5-base, Table A2), in the primary metric's units; the
# calls table states the power these seeds had to detect it (a post-hoc planning figure: it uses the observed paired std).
PAPER_DELTA = {"mrpc": 0.0082}
KINDS = ("pgd", "one_step", "random")
H1 = {"bilora": 0.05, "bilora_rho0.5": 0.5}  # PROTOCOL.md hypothesis 1: flatter than LoRA at its own radius r = rho
H2 = ("bilora", "bilora_rho0.5")  # PROTOCOL.md hypothesis 2: test metric above LoRA's
VERDICT = "verdict.md"  # hand-written beside report.md once the sweep is complete; included as is


def load(runs_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text(encoding="utf-8")) for f in sorted(runs_dir.glob("*.json"))]


def ball(s: dict[str, Any]) -> dict[float, dict[str, float]]:
    """radius -> {pgd, one_step, random} loss increases of one run (full space)."""
    part = ((s.get("sharpness") or {}).get("spaces") or {}).get("full", {}).get("ball")
    if not part:
        return {}
    return {
        p["radius"]: {"pgd": p["pgd"], "one_step": p["one_step"], "random": (p["random"] or {}).get("mean", math.nan)}
        for p in part["radii"]
    }


def quiet(s: dict[str, Any]) -> bool:
    """Whether the run had the CPU to itself: every 1-min load average sampled during the run ≤ cores + 0.5 (a run's own two
    threads count ~2). Step times of other runs are not compared; runs without a record count as loaded."""
    load = s.get("load_avg")
    return bool(load) and max(load) <= s["cpu"]["cores"] + 0.5


def by_seed(runs: list[dict], task: str, method: str) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["phase"] == "sweep" and r["task"] == task and r["method"] == method}


def _fmt(x: float, scale: float = 100.0, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{nd}f}"


def _pair_cell(p, scale: float = 100.0, fmt: str = "+.2f") -> str:
    if p.n < 2:
        return f"{p.mean * scale:{fmt}} (n=1)"
    flag = " †" if p.excludes_zero else ""
    return f"{p.mean * scale:{fmt}} [{p.low * scale:{fmt}}, {p.high * scale:{fmt}}]{flag}"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = math.fsum(xs) / n
    return m, (math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def _vs(a: list[float], b: list[float]) -> dict[str, float]:
    """The paired comparison of a against b (LoRA) as a dict, with ``base``: b's mean over the paired seeds."""
    return paired(a, b).to_dict() | {"base": math.fsum(b) / len(b)}


def analyse(runs: list[dict]) -> dict[str, Any]:
    """The numbers of the report as one JSON-able mapping (results.json)."""
    out: dict[str, Any] = {"tasks": {}, "tuning": {}, "runs": {r["name"]: r["hash"] for r in runs}}
    for r in runs:
        if r["phase"] == "tune":
            cell = out["tuning"].setdefault(f"{r['lr']:g}", {})
            cell[r["task"]] = {k: r["metrics"][k][protocol.PRIMARY[r["task"]]] for k in ("validation", "test")}
    for task in protocol.TASKS:
        main = protocol.PRIMARY[task]
        lora = by_seed(runs, task, "lora")
        t: dict[str, Any] = {"primary": main, "threshold": protocol.THRESHOLD[task], "methods": {}}
        for method in protocol.SEEDS:
            mine = by_seed(runs, task, method)
            if not mine:
                continue
            seeds = sorted(mine)
            test = [mine[s]["metrics"]["test"][main] for s in seeds]
            f1 = [mine[s]["metrics"]["test"].get("f1", math.nan) for s in seeds]
            train = [mine[s]["metrics"].get("train", {}).get(main, math.nan) for s in seeds]
            m: dict[str, Any] = {
                "seeds": seeds,
                "test": _mean_std(test),
                "f1": _mean_std(f1),
                "gap": _mean_std([a - b for a, b in zip(train, test)]),
                "step_time": {},
                "ball": {},
            }
            for s in seeds:
                cls = mine[s]["cpu"]["class"]
                if quiet(mine[s]):
                    m["step_time"].setdefault(cls, []).append(mine[s]["finetune"]["median_step_time"])
            radii = sorted(ball(mine[seeds[0]]))
            for rad in radii:
                m["ball"][rad] = {k: _mean_std([ball(mine[s])[rad][k] for s in seeds]) for k in KINDS}
            common = [s for s in seeds if s in lora]
            if method != "lora" and len(common) >= 1:
                m["vs_lora"] = {
                    "seeds": common,
                    "test": _vs([mine[s]["metrics"]["test"][main] for s in common], [lora[s]["metrics"]["test"][main] for s in common]),
                }
                ratios = [
                    mine[s]["finetune"]["median_step_time"] / lora[s]["finetune"]["median_step_time"]
                    for s in common
                    if quiet(mine[s]) and quiet(lora[s]) and mine[s]["cpu"]["model"] == lora[s]["cpu"]["model"]
                ]
                m["vs_lora"]["step_ratio"] = {"n": len(ratios), "mean": math.fsum(ratios) / len(ratios) if ratios else math.nan,
                                              "min": min(ratios, default=math.nan), "max": max(ratios, default=math.nan)}  # fmt: skip
                m["vs_lora"]["ball"] = {
                    rad: {k: _vs([ball(mine[s])[rad][k] for s in common], [ball(lora[s])[rad][k] for s in common]) for k in KINDS}
                    for rad in radii
                    if all(rad in ball(lora[s]) for s in common)
                }
            t["methods"][method] = m
        out["tasks"][task] = t
    return out


def calls(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The pre-registered calls of PROTOCOL.md, per task: H1 (Bi-LoRA at rho has a lower projected-attack increase
    than LoRA at r = rho) and H2 (Bi-LoRA's primary test metric is above LoRA's), each decided by the rule: the
    paired 95 % interval excludes 0. ``call`` is "supported", "contradicted" (excludes 0 the other way) or
    "unresolved"; ``excludes_zero`` is that test (an interval "narrower than the observed effect", half-width < |mean|,
    is the same test, so it is not reported separately); ``half_width`` is the interval's half-width, ``sd`` the paired
    differences' std, ``lora`` LoRA's mean over the paired seeds, and for H2 on a task in :data:`PAPER_DELTA`,
    ``power_paper`` is the chance these seeds had to exclude 0 if the true difference were the paper's, taking the
    observed ``sd`` as the true one (post-hoc)."""
    out = []
    for task, t in res["tasks"].items():
        lora = t["methods"].get("lora")
        cells = [("H1", m, "pgd", rho, -1) for m, rho in H1.items()] + [("H2", m, "test", None, +1) for m in H2]
        for hyp, method, what, rad, want in cells:
            vs = t["methods"].get(method, {}).get("vs_lora")
            d = (vs or {}).get("test") if what == "test" else (vs or {}).get("ball", {}).get(rad, {}).get("pgd")
            if not d or not lora:
                continue
            base = d["base"]  # LoRA's mean over the paired seeds
            half = (d["high"] - d["low"]) / 2 if d["n"] > 1 else math.nan
            excl = d["n"] > 1 and (d["low"] > 0 or d["high"] < 0)
            call = "unresolved" if not excl else ("supported" if (d["mean"] > 0) == (want > 0) else "contradicted")
            paper = PAPER_DELTA.get(task) if hyp == "H2" else None
            out.append({
                "task": task, "hypothesis": hyp, "method": method, "radius": rad, "n": d["n"], "mean": d["mean"],
                "low": d["low"], "high": d["high"], "half_width": half, "sd": d["std"], "lora": base,
                "relative": d["mean"] / base if base else math.nan, "call": call, "excludes_zero": excl,
                "paper": paper, "power_paper": power(paper, d["std"], d["n"]) if paper is not None else None,
            })  # fmt: skip
    return out


def _calls_md(cs: list[dict[str, Any]], complete: bool) -> list[str]:
    md = [
        "## Pre-registered calls (PROTOCOL.md: H1 flatter at r = ρ, H2 higher test metric; real when the 95 % interval excludes 0)",
        "",
    ]
    if not complete:
        md += ["*Provisional: the sweep is incomplete, and the calls are made on the complete sweep only.*", ""]
    md += [
        "| task | hypothesis | run | seeds | Δ vs LoRA, same seeds [95 % CI] | LoRA mean, same seeds | relative to LoRA | call "
        "| paired std | power for the paper's Δ (post-hoc) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cs:
        what = f"flatter at r = {c['radius']:g}" if c["hypothesis"] == "H1" else "higher test metric"
        scale, fmt = 100.0, ("+.3g" if c["hypothesis"] == "H1" else "+.2f")
        ci = (
            f"{c['mean'] * scale:{fmt}} [{c['low'] * scale:{fmt}}, {c['high'] * scale:{fmt}}]"
            if c["n"] > 1
            else f"{c['mean'] * scale:{fmt}} (n=1)"
        )
        base = f"{c['lora'] * scale:.3g}" if c["hypothesis"] == "H1" else f"{c['lora'] * scale:.2f}"
        sd = "-" if c["n"] < 2 else f"{c['sd'] * scale:.3g}"
        pw = "-"
        if c.get("paper") is not None and c["n"] > 1:
            pw = f"{c['power_paper'] * 100:.0f} % for {c['paper'] * scale:+.2f}"
        md.append(
            f"| {c['task']} | {c['hypothesis']}: {what} | {c['method']} | {c['n']} | {ci} | {base} | {c['relative'] * 100:+.1f} % "
            f"| {c['call']} | {sd} | {pw} |"
        )
    md += [
        "",
        "Δ: flatness ×100 (loss increase), test metric in points, paired with LoRA on the same seeds; relative: Δ over LoRA's "
        "mean on those seeds. The call is the protocol's rule (the 95 % interval excludes 0); whether the interval is "
        "narrower than |Δ| is the same test, so it is not a separate column (PROTOCOL.md Revision 7). Power: the chance "
        "that a paired t-test at 5 % (two-sided) on these seeds excludes 0 if the true Δ were the paper's (Bi-LoRA over "
        "LoRA on T5-base; MRPC only), taking the observed paired std as the true one (noncentral t). It is a post-hoc "
        "planning figure, not part of any call.",
        "",
    ]
    return md


def _seeds(seeds: list[int]) -> str:
    """0-4 for a run of consecutive seeds, else 0, 2, 5."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def _paired_from(d: dict) -> Any:
    from pipeline.science.stats import Paired

    return Paired(**{k: v for k, v in d.items() if k != "base"})


def markdown(res: dict[str, Any], runs: list[dict], verdict: str | None = None, stale: list[dict] | None = None) -> str:
    """report.md; ``stale``: the summaries left out (their wall time is counted in the cost line, as the runs did run)."""
    expected = len(protocol.sweep_runs()) + len(protocol.tune_runs())
    commits = sorted({r["code"]["commit"][:10] for r in runs})
    cpus = sorted({f"{r['cpu']['model']} ({r['cpu']['class']}, {r['cpu']['cores']} cores)" for r in runs})
    md = [
        "# Where Bi-LoRA should win: the pre-registered comparison",
        "",
        "Built by `python -m pipeline.science.sweep report` from `reports/science/runs/*.json` alone; the protocol is "
        "[PROTOCOL.md](PROTOCOL.md). Metric values are in points (%), loss increases ×100.",
        "",
        f"- runs summarised: **{len(runs)} of {expected}** (tuning {sum(r['phase'] == 'tune' for r in runs)} of {len(protocol.tune_runs())})",
        f"- code revision(s): {', '.join(commits) or '-'}; CPU(s): {'; '.join(cpus) or '-'}",
        f"- wall time of the summarised runs: {sum(r['wall_s'] for r in runs) / 3600:.2f} h"
        + (
            f"; of every committed summary, including the {len(stale)} left out as stale: "
            f"{sum(r['wall_s'] for r in runs + stale) / 3600:.2f} h"
            if stale
            else ""
        ),
        "",
    ]
    complete = len(runs) >= expected
    if not complete:
        md += ["**The sweep is incomplete: no verdict is drawn from these numbers yet.**", ""]
    elif verdict:
        md += ["## Verdict (written by hand from the complete sweep: [verdict.md](verdict.md))", "", verdict.strip(), ""]
    else:
        md += [f"**The sweep is complete; the verdict is not written yet ({VERDICT}).**", ""]
    if res["tuning"]:
        md += [
            "## Learning-rate tuning (LoRA, seed 0; chosen on validation, mean over tasks)",
            "",
            "| lr | " + " | ".join(f"{t} val | {t} test" for t in protocol.TASKS) + " |",
            "|---|" + "---|---|" * len(protocol.TASKS),
        ]
        full = {lr: c for lr, c in res["tuning"].items() if all(t in c for t in protocol.TASKS)}
        chosen = max(sorted(full, key=float), key=lambda lr: sum(full[lr][t]["validation"] for t in protocol.TASKS)) if full else None
        for lr, cell in sorted(res["tuning"].items(), key=lambda kv: float(kv[0])):
            lr = f"**{lr}** (chosen)" if lr == chosen else lr
            md.append(
                f"| {lr} | "
                + " | ".join(f"{_fmt(cell[t]['validation'])} | {_fmt(cell[t]['test'])}" if t in cell else "- | -" for t in protocol.TASKS)
                + " |"
            )
        md.append("")
        if chosen is not None:
            for t in protocol.TASKS:
                value, (need, what) = full[chosen][t]["test"], protocol.THRESHOLD[t]
                verdict = "meets" if value >= need else "**does not meet**"
                md.append(
                    f"- {t}: LoRA seed 0 at the chosen lr reaches test {protocol.PRIMARY[t]} {value * 100:.2f} "
                    f"(learnability threshold {need * 100:.2f}, {what}): it {verdict} the rule."
                )
            md.append("")
    for task, t in res["tasks"].items():
        if not t["methods"]:
            continue
        need, what = t["threshold"]
        md += [f"## {task.upper()} (primary: test {t['primary']}; learnability threshold {_fmt(need)}, {what})", ""]
        lora = t["methods"].get("lora")
        if lora:
            verdict = "meets" if lora["test"][0] >= need else "**does not meet**"
            md += [f"LoRA's mean test {t['primary']} {_fmt(lora['test'][0])} {verdict} the threshold.", ""]
        md += [
            "| run | seeds | test | Δ vs LoRA, same seeds [95 % CI] | LoRA mean, same seeds | test F1 (secondary) | train − test gap "
            "| median s/step, quiet runs only | s/step ÷ LoRA's, same seed and CPU |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, m in t["methods"].items():
            vs = _pair_cell(_paired_from(m["vs_lora"]["test"])) if "vs_lora" in m else "-"
            base = f"{_fmt(m['vs_lora']['test']['base'])} (seeds {_seeds(m['vs_lora']['seeds'])})" if "vs_lora" in m else "-"
            st = "; ".join(f"{cls}: {sum(v) / len(v):.3f} (n={len(v)})" for cls, v in m["step_time"].items()) or "- (no quiet run)"
            f1 = "-" if math.isnan(m["f1"][0]) else f"{_fmt(m['f1'][0])} ± {_fmt(m['f1'][1])}"
            gap = f"{_fmt(m['gap'][0])} ± {_fmt(m['gap'][1])}"
            sr = m.get("vs_lora", {}).get("step_ratio", {})
            ratio = f"{sr['mean']:.2f} ({sr['min']:.2f}-{sr['max']:.2f}, n={sr['n']})" if sr.get("n") else "-"
            md.append(
                f"| {method} | {len(m['seeds'])} | {_fmt(m['test'][0])} ± {_fmt(m['test'][1])} | {vs} | {base} | {f1} | {gap} | {st} | {ratio} |"
            )
        md += [
            "",
            "Δ is paired: each run against LoRA's run of the same seed, so a run with fewer seeds is compared with LoRA's mean "
            "on those seeds (the column beside it), not with LoRA's mean over all its seeds in the first row.",
            "",
        ]
        radii = sorted({rad for m in t["methods"].values() for rad in m["ball"]})
        if radii:
            md += [
                "Flatness: loss increase ×100 within the global Frobenius ball of radius r over the adapted layers' merged weights "
                "(projected attack = worst found; one-step = r·g/‖g‖; random = antithetic mean over random directions of norm r), "
                "mean ± std over seeds, and the paired difference against LoRA (bold: the pre-registered H1 cells).",
                "",
                "| run | r | projected | one-step | random | Δ projected vs LoRA [95 % CI] |",
                "|---|---|---|---|---|---|",
            ]
            for method, m in t["methods"].items():
                for rad in radii:
                    if rad not in m["ball"]:
                        continue
                    b = m["ball"][rad]
                    vs = m.get("vs_lora", {}).get("ball", {}).get(rad)
                    cell = _pair_cell(_paired_from(vs["pgd"]), fmt="+.3g") if vs else "-"
                    if H1.get(method) == rad:
                        cell = f"**H1: {cell}**"
                    cells = " | ".join(f"{b[k][0] * 100:.3g} ± {b[k][1] * 100:.3g}" for k in KINDS)
                    md.append(f"| {method} | {rad:g} | {cells} | {cell} |")
            md.append("")
    cs = calls(res)
    if cs:
        md += _calls_md(cs, complete)
    md += exploratory.markdown(runs, ball)
    md += [
        "## Reading the intervals",
        "",
        "† marks a 95 % paired interval that excludes 0. The intervals cover the spread over seeds (data order and "
        "initialisation) on one fixed test set, not the sampling of the test set itself. Per task the report makes 4 accuracy "
        "calls and 4 radii × 4 runs of flatness calls; about 1 in 20 of them excludes 0 when nothing differs, so only the "
        "pre-registered cells carry a claim (H1: bold; H2: the Bi-LoRA rows' Δ test). Step times: runs of one seed ran "
        "back to back on one machine, so the ratio to LoRA's run of the same seed (both quiet, same CPU model) compares "
        "methods without the machine-to-machine spread of the absolute times.",
        "",
        "## Paper",
        "",
        PAPER_DIRECTION,
        "",
    ]
    return "\n".join(md)


def figures(res: dict[str, Any], runs: list[dict], out_dir: Path) -> list[Path]:
    """flatness_vs_radius.png (projected-attack increase against r, mean ± std over seeds), flatness_vs_rho.png
    (the same against Bi-LoRA's ρ, LoRA as ρ = 0, a line per radius) and accuracy_vs_flatness.png (every run: test
    metric against its increase at r = 0.05 and 0.5, the radii the two Bi-LoRA runs defend); [] without ball data."""
    from pipeline.report.charts import save as _save, plt

    tasks = [t for t, v in res["tasks"].items() if any(m["ball"] for m in v["methods"].values())]
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, m in res["tasks"][task]["methods"].items():
            radii = sorted(m["ball"])
            ax.errorbar(
                radii,
                [m["ball"][r]["pgd"][0] for r in radii],
                yerr=[m["ball"][r]["pgd"][1] for r in radii],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set(xscale="log", yscale="log", xlabel="global radius r", ylabel="loss increase (projected attack)", title=task.upper())
        ax.legend(fontsize=8)
    _save(fig, out_dir / "flatness_vs_radius.png")
    radii = (protocol.RADII[0], protocol.RADII[-1])  # the radii the two Bi-LoRA runs defend
    fig, axes = plt.subplots(len(radii), len(tasks), figsize=(5.5 * len(tasks), 4 * len(radii)), squeeze=False)
    for row, r0 in zip(axes, radii):
        for ax, task in zip(row, tasks):
            main = protocol.PRIMARY[task]
            for method in res["tasks"][task]["methods"]:
                pts = [(ball(r)[r0]["pgd"], r["metrics"]["test"][main]) for r in by_seed(runs, task, method).values() if r0 in ball(r)]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method, s=18)
            ax.set(xscale="log", xlabel=f"loss increase at r = {r0:g} (projected attack)", ylabel=f"test {main}", title=task.upper())
            ax.legend(fontsize=8)
    _save(fig, out_dir / "accuracy_vs_flatness.png")
    # flatness against rho: LoRA is rho = 0, then Bi-LoRA at each rho of H1; one line per attack radius
    ladder = [("lora", "LoRA\n(ρ = 0)")] + [(m, f"{m}\n(ρ = {rho:g})") for m, rho in H1.items()]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ms = res["tasks"][task]["methods"]
        have = [(i, m) for i, (m, _) in enumerate(ladder) if m in ms and ms[m]["ball"]]
        for rad in protocol.RADII:
            pts = [(i, ms[m]["ball"][rad]["pgd"]) for i, m in have if rad in ms[m]["ball"]]
            ax.errorbar(
                [p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o", capsize=3, label=f"r = {rad:g}"
            )
        ax.set_xticks(range(len(ladder)), [label for _, label in ladder], fontsize=8)
        ax.set(yscale="log", ylabel="loss increase (projected attack)", title=f"{task.upper()}: flatness against ρ")
        ax.legend(fontsize=8)
    _save(fig, out_dir / "flatness_vs_rho.png")
    return [out_dir / "flatness_vs_radius.png", out_dir / "flatness_vs_rho.png", out_dir / "accuracy_vs_flatness.png"]


def write(runs_dir: Path, out_dir: Path, expected: dict[str, str] | None = None) -> list[Path]:
    """Write report.md, results.json and the figures into ``out_dir``; returns their paths. With ``expected``
    (run name -> hash at the sweep's revision and preset), summaries with another hash are left out as stale."""
    runs = load(runs_dir)
    left = [r for r in runs if expected is not None and expected.get(r["name"]) != r["hash"]]
    stale = [r["name"] for r in left]
    runs = [r for r in runs if r["name"] not in stale]
    res = analyse(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", json.loads(json.dumps(res | {"calls": calls(res)}, default=str)))
    pngs = figures(res, runs, out_dir)
    verdict = out_dir / VERDICT
    text = markdown(res, runs, verdict.read_text(encoding="utf-8") if verdict.exists() else None, left)
    if stale:
        text += (
            "\nLeft out as stale (another code revision, preset or task set than the current protocol; the RTE tuning runs "
            f"are the evidence for Revision 3 of PROTOCOL.md): {', '.join(sorted(stale))}\n"
        )
    if pngs:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    atomic_write_text(out_dir / "report.md", text)
    return [out_dir / "results.json", out_dir / "report.md", *pngs]
