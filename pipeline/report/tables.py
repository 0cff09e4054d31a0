"""The report's tables: the Markdown of ``reports/report.md``, ``summary.json`` and the terminal table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from pipeline.stage import layout
from pipeline.config.schema import Params
from pipeline.report.collect import SPACES, Collected, Group, mean_std
from pipeline.data.catalog import get_task
from bilora.metrics import improvement

# Paper anchors for context only (GLUE dev, %; MRPC and SST-2 accuracy, CoLA MCC). LoRA, LoRA-SAM and
# Bi-LoRA: Bi-LoRA paper Table A2 (T5-base). Flat-LoRA: Flat-LoRA paper Table 1 (T5-base, r 8; its
# CoLA column is accuracy, so it is left out here). docs/methods.md lists the papers.
PAPER_T5 = {
    "mrpc": {"lora": 88.56, "lora_sam": 88.73, "bilora": 89.38, "flat_lora": 89.59},
    "cola": {"lora": 59.41, "lora_sam": 59.80, "bilora": 60.77},
    "sst2": {"lora": 94.23, "lora_sam": 94.46, "bilora": 94.34, "flat_lora": 94.75},
}


def split_note(tasks: list[str], test_subset: int | None, data=None) -> str:
    """What "test" means for these tasks, and what the paper column is (GLUE tasks only)."""
    files = ", ".join(f"{t}: `{get_task(t, data).test_file}`" for t in tasks)
    subset = f" (first {test_subset} rows)" if test_subset else ""
    glue = any(get_task(t, data).test_file.startswith("glue/") for t in tasks)
    note = (
        f"Test split{subset}: {files}"
        + (" (GLUE test labels are private, so GLUE tasks use dev)" if glue else "")
        + ". Metrics are fractions."
    )
    if any(t in PAPER_T5 for t in tasks):
        note += " Paper anchors are **from the papers (T5-base, %; Bi-LoRA Table A2, Flat-LoRA Table 1)**, for context only: another model, full data and many more steps, not comparable in absolute terms."
    return note


def eval_only_note(p: Params) -> str:
    """Report header: which data.tasks adapter scores each eval-only dataset (its s/step is that training's)."""
    if not p.data.eval_tasks:
        return ""
    pairs = ", ".join(f"{t} with the adapters of {p.data.datasets[t].adapter_from}" for t in p.data.eval_tasks)
    return f", eval-only {pairs} (no training of their own: their s/step is the adapter's training)"


def _fmt(g: Group, kind: str, space: str, main: str = "") -> str:
    """Mean ± std over seeds of the headline figure at the largest radius (random) or alpha (attack)."""
    xs = g.headline(kind, space, main)
    if xs is None:
        return "-"
    m, s = mean_std(xs)
    return f"{m:.4f} ± {s:.4f}"


def _by_space(g: Group, kind: str, main: str = "") -> str:
    """Terminal cell: the headline mean per measured space, one line each (``full 0.0058``)."""
    lines = [f"{space} {mean_std(xs)[0]:.4f}" for space in SPACES if (xs := g.headline(kind, space, main)) is not None]
    return "\n".join(lines) or "-"


def terminal_table(rows: list[dict]) -> Table:
    """The stage's closing table, readable at 80 columns: one two-line row per task x method
    (``sst2.lora`` over ``accuracy, n=3``: main test metric, number of seeds).

    ``rows``: dicts with ``task, method, main, seeds, mean, std, gap, sharpness, attack, step_time``
    (``gap``, ``sharpness``, ``attack`` already formatted). Stds of sharpness and attack, every
    test metric and the paper anchors are in report.md."""
    table = Table(title="bilora: test metrics (mean ± std over seeds)", caption="n: seeds · gap: train - test · details: reports/report.md")
    table.add_column("run", overflow="fold")
    for col in ("test", "gap", "sharpness", "attack", "s/step"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        via = f", adapter of {r['adapter_from']}" if r.get("adapter_from") else ""
        table.add_row(
            f"{r['task']}.{r['method']}\n[dim]{r['main']}, n={r['seeds']}{via}[/]",
            f"{r['mean']:.4f}\n±{r['std']:.4f}",
            r["gap"],
            r["sharpness"],
            r["attack"],
            f"{r['step_time']:.3f}",
        )
    return table


def _paired(p: Params, groups: dict[tuple[str, str], Group]) -> list[str]:
    """Each method minus LoRA, paired by seed: main test metric and random sharpness at the largest radius."""
    md = [
        "## Each method minus LoRA, paired by seed",
        "",
        "Differences of the main test metric and of the random sharpness (largest radius) against the LoRA run with the same seed "
        "(same data order, same initialisation of the shared parts). "
        f"With {len(p.train.seeds)} seed(s), a mean difference smaller than its std is not evidence either way.",
        "",
        "| task | method | Δ main metric | seeds better | Δ sharpness full | Δ sharpness lora |",
        "|---|---|---|---|---|---|",
    ]
    for task in p.data.evaluated:
        main = get_task(task, p.data).main_metric
        base = groups.get((task, "lora"))
        for method in p.train.methods:
            g = groups.get((task, method))
            if method == "lora" or not g or not base:
                continue
            d = [a - b for a, b in zip(g.test[main], base.test[main])]
            m, sd = mean_std(d)
            cells = []
            for space in SPACES:
                by_r = g.random(space)
                if by_r:
                    t = max(by_r)
                    dm, ds = mean_std([a - b for a, b in zip(by_r[t], base.random(space).get(t, []))])
                    cells.append(f"{dm:+.4f} ± {ds:.4f}")
                else:
                    cells.append("-")
            md.append(
                f"| {task} | {method} | {m:+.4f} ± {sd:.4f} | {sum(improvement(main, a, b) > 0 for a, b in zip(g.test[main], base.test[main]))} / {len(d)} | {cells[0]} | {cells[1]} |"
            )
    return md + [""]


def detail_tables(p: Params, groups: dict[tuple[str, str], Group]) -> list[str]:
    """Markdown: each method minus LoRA paired by seed; attack metric at every alpha; random sharpness at every radius."""
    md: list[str] = _paired(p, groups) if "lora" in p.train.methods else []
    for kind, title in (
        ("attack", "Worst-case attack: main test metric at each alpha (mean ± std over seeds)"),
        ("random", "Random filter-normalised sharpness: mean loss increase at each radius (mean ± std over seeds)"),
    ):
        for space in SPACES:
            for task in p.data.evaluated:
                main = get_task(task, p.data).main_metric

                def by_x(g: Group | None) -> dict[float, list[float]]:
                    if g is None:
                        return {}
                    return g.attack(space, main) if kind == "attack" else g.random(space)

                cols = sorted(by_x(groups.get((task, p.train.methods[0]))))
                if not cols:
                    continue
                label = "alpha" if kind == "attack" else "radius"
                md += [
                    f"### {title}: {task}, {space} space",
                    "",
                    "| method | " + " | ".join(f"{label} {x:g}" for x in cols) + " |",
                    "|---" * (len(cols) + 1) + "|",
                ]
                for method in p.train.methods:
                    values = by_x(groups.get((task, method)))
                    md.append(f"| {method} | " + " | ".join("{:.4f} ± {:.4f}".format(*mean_std(values.get(x, []))) for x in cols) + " |")
                md.append("")
    return md


def main_table(p: Params, data: Collected) -> tuple[list[str], list[dict], dict[str, Any]]:
    """(Markdown header and main table, terminal-table rows, summary.json content)."""
    md = [
        "# bilora comparison report",
        "",
        f"Tasks {p.data.tasks}{eval_only_note(p)}, methods {p.train.methods}, seeds {p.train.seeds}. Base `{p.base.source}` (4-bit {p.base.quant.quant_type if p.base.quant.enabled else 'off'}).",
        f"Train subset {p.data.train_subset}, max length {p.data.max_length}, epochs {p.train.loop.epochs}, batch {p.train.loop.batch_size}x{p.train.loop.grad_accum}, lr {p.train.loop.lr}.",
        split_note(p.data.evaluated, p.data.test_subset, p.data),
        "",
        "Sharpness: mean loss increase under random filter-normalised perturbations at the largest radius (full weight space | LoRA space).",
        "Attack: the main test metric after the largest worst-case step alpha (full | LoRA space). Both: mean over seeds.",
        "",
        "| task | method | seeds | main metric | all test metrics | train-test gap | sharpness (full \\| lora) | attack (full \\| lora) | median s/step | paper (T5, %) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows, summary = [], {}
    for (task, method), g in data.groups.items():
        main = get_task(task, p.data).main_metric
        mm, ms = mean_std(g.test[main])
        others = ", ".join(f"{k} {mean_std(v)[0]:.4f}" for k, v in g.test.items())
        gap = g.gap.get(main)
        gap_s = f"{mean_std(gap)[0]:+.4f}" if gap else "n/a"
        st = mean_std(g.step_time)[0]
        paper = PAPER_T5.get(task, {}).get(method)
        paper_s = f"{paper:.2f}" if paper is not None else "-"
        n = len(g.test[main])
        sharp_s = " \\| ".join(_fmt(g, "random", space) for space in SPACES)
        attack_s = " \\| ".join(_fmt(g, "attack", space, main) for space in SPACES)
        label = f"{task} (adapter of {g.adapter_from})" if g.adapter_from else task
        md.append(
            f"| {label} | {method} | {n} | {main} {mm:.4f} ± {ms:.4f} | {others} | {gap_s} | {sharp_s} | {attack_s} | {st:.3f} | {paper_s} |"
        )
        rows.append(
            {
                "task": task,
                "method": method,
                "main": main,
                "seeds": n,
                "mean": mm,
                "std": ms,
                "gap": gap_s,
                "adapter_from": g.adapter_from,
                "sharpness": _by_space(g, "random"),
                "attack": _by_space(g, "attack", main),
                "step_time": st,
            }
        )
        summary[f"{task}.{method}"] = {"main_metric": main, "mean": mm, "std": ms, "n_seeds": n, "median_step_time": st} | (
            {"adapter_from": g.adapter_from} if g.adapter_from else {}
        )
    return md, rows, summary


def headline_metrics(p: Params, data: Collected) -> dict[str, dict[str, float]]:
    """``reports/metrics.json``, the pipeline's one DVC ``metrics:`` file: per run (``<task>-<method>-<seed>``)
    ``test``, the task's main test metric, and ``sharp``, the random filter-normalised sharpness in the
    full weight space at the largest radius (when measured). Two figures per run, so that
    ``dvc exp show --only-changed`` of an experiment that changes one method fits 100 columns; the
    train-test gap, the LoRA-space and attack figures and every other metric stay in
    ``metrics/<run>.json`` and report.md. Timings never enter it (they differ between machines)."""
    out: dict[str, dict[str, float]] = {}
    for task in p.data.tasks:
        main = get_task(task, p.data).main_metric
        for method in p.train.methods:
            g = data.groups[(task, method)]
            for i, seed in enumerate(p.train.seeds):
                name = layout.run_name(task, method, seed)
                row = {"test": g.test[main][i]}
                res = data.sharpness.get(name)
                largest = res.spaces["full"].random.largest() if res is not None and "full" in res.spaces else None
                if largest is not None:
                    row["sharp"] = largest.mean
                out[name] = row
    return out
