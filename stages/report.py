"""DVC stage ``report``: compare methods across seeds -> reports/report.md, reports/loss_curves.png, a rich summary table."""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from bilora.io import atomic_write_json, atomic_write_text  # noqa: E402
from pipeline import layout  # noqa: E402
from pipeline.config import Params, flatten, load_params  # noqa: E402
from pipeline.console import console, header  # noqa: E402
from pipeline.errors import cli  # noqa: E402
from pipeline.figures import rounded  # noqa: E402
from pipeline.catalog import get_task as _get_task  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402

# Paper anchors for context only (GLUE dev, %; MRPC and SST-2 accuracy, CoLA MCC). LoRA, LoRA-SAM and
# Bi-LoRA: Bi-LoRA paper Table A2 (T5-base). Flat-LoRA: Flat-LoRA paper Table 1 (T5-base, r 8; its
# CoLA column is accuracy, so it is left out here). methods.md lists them with their sources.
PAPER_T5 = {
    "mrpc": {"lora": 88.56, "lora_sam": 88.73, "bilora": 89.38, "flat_lora": 89.59},
    "cola": {"lora": 59.41, "lora_sam": 59.80, "bilora": 60.77},
    "sst2": {"lora": 94.23, "lora_sam": 94.46, "bilora": 94.34, "flat_lora": 94.75},
}


_DATA = None  # params.data, set by main(): declared datasets are looked up there


def get_task(name: str):
    return _get_task(name, _DATA)


def _split_note(tasks: list[str], test_subset: int | None) -> str:
    """What "test" means for these tasks, and what the paper column is (GLUE tasks only)."""
    files = ", ".join(f"{t}: `{get_task(t).test_file}`" for t in tasks)
    subset = f" (first {test_subset} rows)" if test_subset else ""
    glue = any(get_task(t).test_file.startswith("glue/") for t in tasks)
    note = f"Test split{subset}: {files}" + (" (GLUE test labels are private, so GLUE tasks use dev)" if glue else "") + ". Metrics are fractions."
    if any(t in PAPER_T5 for t in tasks):
        note += " Paper anchors are **from the papers (T5-base, %; Bi-LoRA Table A2, Flat-LoRA Table 1)**, for context only: another model, full data and many more steps, not comparable in absolute terms."
    return note


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def _keyed(r: dict, pattern: str) -> list[tuple[float, str]]:
    """(number, key) for every key of ``r`` matching ``pattern`` (one float group), sorted by number."""
    pat = re.compile(pattern)
    return sorted((float(m.group(1)), k) for k in r if (m := pat.match(k)))


def _headline(r: dict, kind: str, space: str, main: str = "") -> list[float] | None:
    """Per-seed headline figure at the largest radius (random) or alpha (attack); None if not measured."""
    found = _keyed(r, rf"^sharp\.{space}\.random\.r(.+)\.mean$" if kind == "random" else rf"^sharp\.{space}\.attack\.a(.+)\.{re.escape(main)}$")
    return r[found[-1][1]] if found else None


def _fmt(r: dict, kind: str, space: str, main: str = "") -> str:
    """Mean ± std over seeds of the headline figure at the largest radius (random) or alpha (attack)."""
    xs = _headline(r, kind, space, main)
    if xs is None:
        return "-"
    m, s = _mean_std(xs)
    return f"{m:.4f} ± {s:.4f}"


def _by_space(r: dict, kind: str, main: str = "") -> str:
    """Terminal cell: the headline mean per measured space, one line each (``full 0.0058``)."""
    lines = [f"{space} {_mean_std(xs)[0]:.4f}" for space in ("full", "lora") if (xs := _headline(r, kind, space, main)) is not None]
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
        table.add_row(f"{r['task']}.{r['method']}\n[dim]{r['main']}, n={r['seeds']}[/]", f"{r['mean']:.4f}\n±{r['std']:.4f}", r["gap"],
                      r["sharpness"], r["attack"], f"{r['step_time']:.3f}")
    return table


def detail_tables(p: Params, rows: dict) -> list[str]:
    """Markdown: each method minus LoRA paired by seed; attack metric at every alpha; random sharpness at every radius."""
    md: list[str] = []
    if "lora" in p.train.methods:
        md += ["## Each method minus LoRA, paired by seed", "",
               "Differences of the main test metric and of the random sharpness (largest radius) against the LoRA run with the same seed "
               "(same data order, same initialisation of the shared parts). "
               f"With {len(p.train.seeds)} seed(s), a mean difference smaller than its std is not evidence either way.", "",
               "| task | method | Δ main metric | seeds better | Δ sharpness full | Δ sharpness lora |", "|---|---|---|---|---|---|"]
        for task in p.data.tasks:
            main = get_task(task).main_metric
            base = rows.get((task, "lora"), {})
            for method in p.train.methods:
                r = rows.get((task, method), {})
                if method == "lora" or not r or not base:
                    continue
                d = [a - b for a, b in zip(r[f"test.{main}"], base[f"test.{main}"])]
                m, sd = _mean_std(d)
                cells = []
                for space in ("full", "lora"):
                    keys = _keyed(r, rf"^sharp\.{space}\.random\.r(.+)\.mean$")
                    if keys:
                        k = keys[-1][1]
                        dm, ds = _mean_std([a - b for a, b in zip(r[k], base.get(k, []))])
                        cells.append(f"{dm:+.4f} ± {ds:.4f}")
                    else:
                        cells.append("-")
                md.append(f"| {task} | {method} | {m:+.4f} ± {sd:.4f} | {sum(x > 0 for x in d)} / {len(d)} | {cells[0]} | {cells[1]} |")
        md.append("")
    for kind, title in (("attack", "Worst-case attack: main test metric at each alpha (mean ± std over seeds)"), ("random", "Random filter-normalised sharpness: mean loss increase at each radius (mean ± std over seeds)")):
        for space in ("full", "lora"):
            for task in p.data.tasks:
                main = get_task(task).main_metric
                pattern = rf"^sharp\.{space}\.attack\.a(.+)\.{re.escape(main)}$" if kind == "attack" else rf"^sharp\.{space}\.random\.r(.+)\.mean$"
                cols = _keyed(rows.get((task, p.train.methods[0]), {}), pattern)
                if not cols:
                    continue
                label = "alpha" if kind == "attack" else "radius"
                md += [f"### {title}: {task}, {space} space", "", f"| method | " + " | ".join(f"{label} {x:g}" for x, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
                for method in p.train.methods:
                    r = rows.get((task, method), {})
                    md.append(f"| {method} | " + " | ".join("{:.4f} ± {:.4f}".format(*_mean_std(r.get(k, []))) for _, k in cols) + " |")
                md.append("")
    return md


def collect(p: Params) -> dict:
    rows: dict = defaultdict(lambda: defaultdict(list))
    histories: dict = {}
    sharpness: dict = {}
    for task in p.data.tasks:
        for method in p.train.methods:
            for seed in p.train.seeds:
                name = layout.run_name(task, method, seed)
                # everything the report records and plots is read at the committed precision (pipeline/figures.py)
                metrics = rounded(json.loads(layout.metrics_path(name).read_text()))
                summary = rounded(json.loads((layout.finetune_dir(name) / "summary.json").read_text()))
                histories[name] = rounded(json.loads((layout.finetune_dir(name) / "history.json").read_text()))
                r = rows[(task, method)]
                for k, v in metrics["test"].items():
                    if k != "n":
                        r[f"test.{k}"].append(v)
                for k, v in metrics.get("gap", {}).items():
                    r[f"gap.{k}"].append(v)
                for k, v in metrics.get("sharpness", {}).items():
                    r[f"sharp.{k}"].append(v)
                sharp_file = layout.eval_dir(name) / "sharpness.json"
                if sharp_file.exists():
                    sharpness[name] = rounded(json.loads(sharp_file.read_text()))
                r["step_time"].append(summary["median_step_time"])
                r["final_loss"].append(summary["final_loss"])
    return {"rows": rows, "histories": histories, "sharpness": sharpness}


def plot_losses(p: Params, histories: dict, path) -> None:
    tasks = p.data.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in p.train.methods:
            curves = []
            for seed in p.train.seeds:
                h = histories[layout.run_name(task, method, seed)]
                loss = [x["loss"] for x in h]
                k = max(1, len(loss) // 25)  # moving average over ~4% of the run
                curves.append(([x["step"] for x in h], [statistics.fmean(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]))
            n = min(len(c[1]) for c in curves)
            steps = curves[0][0][:n]
            mean = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
            line = ax.plot(steps, mean, label=f"{method} (mean of {len(curves)} seed(s))")[0]
            if len(curves) > 1:
                ax.fill_between(steps, [min(c[1][i] for c in curves) for i in range(n)], [max(c[1][i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.15)
        ax.set_title(f"{task}: training loss (moving average)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_histories(histories: dict, out_dir) -> None:
    """One JSON per run ([{step, loss}, ...]) for ``dvc plots show`` (dvc.yaml ``plots:``)."""
    from bilora.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        for name, h in histories.items():
            atomic_write_json(tmp / f"{name}.json", [{"step": int(x["step"]), "loss": x["loss"]} for x in h])


def _grid(p: Params, spaces: list[str]):
    fig, axes = plt.subplots(len(p.data.tasks), len(spaces), figsize=(6 * len(spaces), 4 * len(p.data.tasks)), squeeze=False)
    return fig, axes


def _save(fig, path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_sharpness(p: Params, sharpness: dict, out_dir) -> list[str]:
    """Attack curves, 1-D landscape curves and metric-vs-sharpness scatter; returns the file names written."""
    if not sharpness:  # measurement disabled: still write the declared outputs, saying why they are empty
        for f in ("attack_curves.png", "landscape_1d.png", "metric_vs_sharpness.png"):
            fig, ax = plt.subplots(figsize=(6, 2))
            ax.axis("off")
            ax.text(0.5, 0.5, "no sharpness measured (eval.sharpness.enabled: false)", ha="center", va="center")
            _save(fig, out_dir / f)
        return []
    spaces = list(next(iter(sharpness.values()))["spaces"])
    written = []
    # 1) attack curves: task metric vs alpha, mean over seeds
    fig, axes = _grid(p, spaces)
    for i, task in enumerate(p.data.tasks):
        main = get_task(task).main_metric
        for j, space in enumerate(spaces):
            ax = axes[i][j]
            for method in p.train.methods:
                runs = [sharpness.get(layout.run_name(task, method, s)) for s in p.train.seeds]
                runs = [r for r in runs if r and r["spaces"][space]["attack"]]
                if not runs:
                    continue
                alphas = [pt["alpha"] for pt in runs[0]["spaces"][space]["attack"]["points"]]
                vals = [statistics.fmean(r["spaces"][space]["attack"]["points"][k]["metrics"].get(main, float("nan")) for r in runs) for k in range(len(alphas))]
                ax.plot(alphas, vals, marker="o", label=method)
            ax.set_title(f"{task}: worst-case attack, {space} space")
            ax.set_xlabel("alpha (step along grad/||grad||)")
            ax.set_ylabel(main)
            ax.legend(fontsize=8)
    _save(fig, out_dir / "attack_curves.png")
    written.append("attack_curves.png")
    # 2) 1-D loss landscape along a random filter-normalised direction
    fig, axes = _grid(p, spaces)
    for i, task in enumerate(p.data.tasks):
        for j, space in enumerate(spaces):
            ax = axes[i][j]
            for method in p.train.methods:
                runs = [sharpness.get(layout.run_name(task, method, s)) for s in p.train.seeds]
                runs = [r for r in runs if r and r["spaces"][space]["curve"]]
                if not runs:
                    continue
                ts = [c[0] for c in runs[0]["spaces"][space]["curve"]]
                ls = [statistics.fmean(r["spaces"][space]["curve"][k][1] for r in runs) for k in range(len(ts))]
                ax.plot(ts, ls, marker=".", label=method)
            ax.set_title(f"{task}: 1-D loss landscape, {space} space")
            ax.set_xlabel("t (fraction of each row norm)")
            ax.set_ylabel("loss")
            ax.legend(fontsize=8)
    _save(fig, out_dir / "landscape_1d.png")
    written.append("landscape_1d.png")
    # 3) task metric vs random sharpness (largest radius, full space if present), one point per run
    space = "full" if "full" in spaces else spaces[0]
    fig, axes = plt.subplots(1, len(p.data.tasks), figsize=(6 * len(p.data.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], p.data.tasks):
        for method in p.train.methods:
            xs, ys = [], []
            for s in p.train.seeds:
                r = sharpness.get(layout.run_name(task, method, s))
                if not r or not r["spaces"][space]["random"]["radii"]:
                    continue
                xs.append(r["spaces"][space]["random"]["radii"][-1]["mean"])
                ys.append(json.loads(layout.metrics_path(layout.run_name(task, method, s)).read_text())["test"][get_task(task).main_metric])
            ax.scatter(xs, ys, label=method)
        ax.set_title(f"{task}: test metric vs random sharpness ({space})")
        ax.set_xlabel("mean loss increase at the largest radius")
        ax.set_ylabel(get_task(task).main_metric)
        ax.legend(fontsize=8)
    _save(fig, out_dir / "metric_vs_sharpness.png")
    written.append("metric_vs_sharpness.png")
    return written


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    global _DATA
    _DATA = p.data
    header("report")
    data = collect(p)
    layout.REPORTS.mkdir(exist_ok=True)
    table_rows = []
    md = [
        "# bilora comparison report",
        "",
        f"Tasks {p.data.tasks}, methods {p.train.methods}, seeds {p.train.seeds}. Base `{p.base.source}` (4-bit {p.base.quant.quant_type if p.base.quant.enabled else 'off'}).",
        f"Train subset {p.data.train_subset}, max length {p.data.max_length}, epochs {p.train.loop.epochs}, batch {p.train.loop.batch_size}x{p.train.loop.grad_accum}, lr {p.train.loop.lr}.",
        _split_note(p.data.tasks, p.data.test_subset),
        "",
        "Sharpness: mean loss increase under random filter-normalised perturbations at the largest radius (full weight space | LoRA space).",
        "Attack: the main test metric after the largest worst-case step alpha (full | LoRA space). Both: mean over seeds.",
        "",
        "| task | method | seeds | main metric | all test metrics | train-test gap | sharpness (full \\| lora) | attack (full \\| lora) | median s/step | paper (T5, %) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for (task, method), r in data["rows"].items():
        main = get_task(task).main_metric
        mm, ms = _mean_std(r[f"test.{main}"])
        others = ", ".join(f"{k[5:]} {_mean_std(v)[0]:.4f}" for k, v in r.items() if k.startswith("test."))
        gap = r.get(f"gap.{main}")
        gap_s = f"{_mean_std(gap)[0]:+.4f}" if gap else "n/a"
        st = _mean_std(r["step_time"])[0]
        paper = PAPER_T5.get(task, {}).get(method)
        paper_s = f"{paper:.2f}" if paper is not None else "-"
        n = len(r[f"test.{main}"])
        sharp_s = " \\| ".join(_fmt(r, "random", space) for space in ("full", "lora"))
        attack_s = " \\| ".join(_fmt(r, "attack", space, main) for space in ("full", "lora"))
        md.append(f"| {task} | {method} | {n} | {main} {mm:.4f} ± {ms:.4f} | {others} | {gap_s} | {sharp_s} | {attack_s} | {st:.3f} | {paper_s} |")
        table_rows.append({"task": task, "method": method, "main": main, "seeds": n, "mean": mm, "std": ms, "gap": gap_s,
                           "sharpness": _by_space(r, "random"), "attack": _by_space(r, "attack", main), "step_time": st})
        summary[f"{task}.{method}"] = {"main_metric": main, "mean": mm, "std": ms, "n_seeds": n, "median_step_time": st}
    md += [""] + detail_tables(p, data["rows"])
    md += ["![training loss](loss_curves.png)", ""]
    extra = plot_sharpness(p, data["sharpness"], layout.REPORTS)
    md += [f"![{f[:-4].replace('_', ' ')}]({f})" for f in extra] + [""]
    tracker = Tracker("report", p.tracking.experiment, flatten({"data.tasks": p.data.tasks, "train.methods": p.train.methods, "train.seeds": p.train.seeds}))
    with tracker:
        plot_losses(p, data["histories"], layout.REPORTS / "loss_curves.png")
        write_histories(data["histories"], layout.REPORTS / "history")
        atomic_write_text(layout.REPORTS / "report.md", "\n".join(md))
        atomic_write_json(layout.REPORTS / "summary.json", rounded(summary))
        for f in ("report.md", "loss_curves.png", "summary.json", *extra):
            tracker.log_artifact(layout.REPORTS / f, "reports")
        for k, v in summary.items():
            tracker.log_metrics({f"{k}.mean": v["mean"], f"{k}.std": v["std"]})
    console.print(terminal_table(table_rows))


if __name__ == "__main__":
    main()
