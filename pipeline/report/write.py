"""Collect the runs and write ``reports/``: report.md, summary.json, the headline metrics.json, the PNGs and history/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilora.io import atomic_write_json, atomic_write_text
from pipeline.config.schema import Params
from pipeline.report.precision import rounded
from pipeline.report.collect import collect
from pipeline.report.charts import PERTURBATION_FILE, plot_losses, plot_perturbation, plot_sharpness, write_histories
from pipeline.report.tables import detail_tables, headline_metrics, main_table


@dataclass
class Written:
    files: list[str]  # names under the reports folder (history/ aside), for the tracker
    rows: list[dict]  # terminal-table rows
    summary: dict[str, Any]  # summary.json content (full precision)


def write_report(p: Params, out_dir: Path) -> Written:
    data = collect(p)
    out_dir.mkdir(exist_ok=True)
    md, rows, summary = main_table(p, data)
    md += [""] + detail_tables(p, data.groups)
    md += ["![training loss](loss_curves.png)", ""]
    extra = plot_sharpness(p, data, out_dir)
    md += [f"![{f[:-4].replace('_', ' ')}]({f})" for f in extra] + [""]
    plot_losses(p, data.histories, out_dir / "loss_curves.png")
    if plot_perturbation(p, data.histories, out_dir / PERTURBATION_FILE):  # a plain figure: not in metrics.json (docs/perturbation.md)
        md += [f"![perturbation diagnostics]({PERTURBATION_FILE})", ""]
        extra.append(PERTURBATION_FILE)
    write_histories(data.histories, out_dir / "history")
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_json(out_dir / "summary.json", rounded(summary))
    atomic_write_json(out_dir / "metrics.json", rounded(headline_metrics(p, data)))
    return Written(["report.md", "loss_curves.png", "summary.json", "metrics.json", *extra], rows, summary)
