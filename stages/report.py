"""DVC stage ``report``: compare methods across seeds -> reports/report.md, the PNGs, summary.json, the headline
``reports/metrics.json`` (the only DVC ``metrics:`` file: ``dvc exp show``), a rich summary table."""

from __future__ import annotations

from pipeline.stage import layout
from pipeline.terminal.console import console
from pipeline.terminal.user_error import cli
from pipeline.report.tables import terminal_table
from pipeline.report.write import write_report
from pipeline.stage.runner import Stage


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("report", __doc__, argv)
    p = stage.params
    stage.header()
    tracker = stage.track(
        {"data.tasks": p.data.tasks, "data.eval_tasks": p.data.eval_tasks, "train.methods": p.train.methods, "train.seeds": p.train.seeds}
    )
    with tracker, stage.output(layout.REPORT_RUN):  # artifacts/report/run_info.json: this run's id, for dvc.lock
        written = write_report(p, layout.REPORTS)
        for f in written.files:
            tracker.log_artifact(layout.REPORTS / f, "reports")
        for k, v in written.summary.items():
            tracker.log_metrics({f"{k}.mean": v["mean"], f"{k}.std": v["std"]})
    console.print(terminal_table(written.rows))


if __name__ == "__main__":
    main()
