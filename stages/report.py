"""DVC stage ``report``: compare methods across seeds -> reports/report.md, reports/loss_curves.png, a rich summary table."""

from __future__ import annotations

import argparse
import json
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
from pipeline.tasks import get_task  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402

# Paper anchors for context only (Bi-LoRA v2 Table A2, T5-base, GLUE dev; MRPC accuracy, CoLA MCC, in %).
PAPER_T5 = {
    "mrpc": {"lora": 88.56, "lora_sam": 88.73, "bilora": 89.38},
    "cola": {"lora": 59.41, "lora_sam": 59.80, "bilora": 60.77},
}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def collect(p: Params) -> dict:
    rows: dict = defaultdict(lambda: defaultdict(list))
    histories: dict = {}
    for task in p.data.tasks:
        for method in p.train.methods:
            for seed in p.train.seeds:
                name = layout.run_name(task, method, seed)
                metrics = json.loads(layout.metrics_path(name).read_text())
                summary = json.loads((layout.finetune_dir(name) / "summary.json").read_text())
                histories[name] = json.loads((layout.finetune_dir(name) / "history.json").read_text())
                r = rows[(task, method)]
                for k, v in metrics["test"].items():
                    if k != "n":
                        r[f"test.{k}"].append(v)
                for k, v in metrics.get("gap", {}).items():
                    r[f"gap.{k}"].append(v)
                r["step_time"].append(summary["median_step_time"])
                r["final_loss"].append(summary["final_loss"])
    return {"rows": rows, "histories": histories}


def plot_losses(p: Params, histories: dict, path) -> None:
    tasks = p.data.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in p.train.methods:
            for seed in p.train.seeds:
                h = histories[layout.run_name(task, method, seed)]
                steps = [x["step"] for x in h]
                loss = [x["loss"] for x in h]
                k = max(1, len(loss) // 25)  # moving average over ~4% of the run
                smooth = [statistics.fmean(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
                ax.plot(steps, smooth, label=f"{method} s{seed}", alpha=0.85)
        ax.set_title(f"{task}: training loss (moving average)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    header("report")
    data = collect(p)
    layout.REPORTS.mkdir(exist_ok=True)
    table = Table(title="bilora: test metrics (mean ± std over seeds)")
    for col in ("task", "method", "seeds", "main metric", "all test metrics", "train-test gap", "s/step", "paper (T5)"):
        table.add_column(col)
    md = [
        "# bilora comparison report",
        "",
        f"Tasks {p.data.tasks}, methods {p.train.methods}, seeds {p.train.seeds}. Base `{p.base.source}` (4-bit {p.base.quant.quant_type if p.base.quant.enabled else 'off'}).",
        f"Train subset {p.data.train_subset}, max length {p.data.max_length}, epochs {p.train.loop.epochs}, batch {p.train.loop.batch_size}x{p.train.loop.grad_accum}, lr {p.train.loop.lr}.",
        "Test split = GLUE dev. Metrics are fractions; paper anchors are **from the Bi-LoRA paper (T5-base, %)**, for context only, not comparable in absolute terms.",
        "",
        "| task | method | seeds | main metric | all test metrics | train-test gap | median s/step | paper (T5, %) |",
        "|---|---|---|---|---|---|---|---|",
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
        md.append(f"| {task} | {method} | {n} | {main} {mm:.4f} ± {ms:.4f} | {others} | {gap_s} | {st:.3f} | {paper_s} |")
        table.add_row(task, method, str(n), f"{main} {mm:.4f} ± {ms:.4f}", others, gap_s, f"{st:.3f}", paper_s)
        summary[f"{task}.{method}"] = {"main_metric": main, "mean": mm, "std": ms, "n_seeds": n, "median_step_time": st}
    md += ["", "![training loss](loss_curves.png)", ""]
    tracker = Tracker("report", p.tracking.experiment, flatten({"data.tasks": p.data.tasks, "train.methods": p.train.methods, "train.seeds": p.train.seeds}))
    with tracker:
        plot_losses(p, data["histories"], layout.REPORTS / "loss_curves.png")
        atomic_write_text(layout.REPORTS / "report.md", "\n".join(md))
        atomic_write_json(layout.REPORTS / "summary.json", summary)
        for f in ("report.md", "loss_curves.png", "summary.json"):
            tracker.log_artifact(layout.REPORTS / f, "reports")
        for k, v in summary.items():
            tracker.log_metrics({f"{k}.mean": v["mean"], f"{k}.std": v["std"]})
    console.print(table)


if __name__ == "__main__":
    main()
