"""Parent MLflow runs: one per ``python -m pipeline.run`` or ``dvc exp run``; its stage runs nest under it.

* ``python -m pipeline.run`` opens the parent (:func:`open_parent`) before ``dvc repro`` and hands its
  id to the stage processes in ``BILORA_PARENT_RUN_ID``; each stage's :class:`pipeline.tracking.tracker.Tracker`
  starts its run with ``parent_run_id`` (MLflow writes the ``mlflow.parentRunId`` tag the UI nests by).
  After the repro it closes the parent (:func:`close_parent`).
* ``dvc exp run`` has no wrapper around it: DVC only sets ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV``
  in every stage's environment. So the first stage that runs finds or creates the experiment's parent
  (:func:`exp_parent`): the run tagged ``bilora.parent=exp``, ``dvc.exp=<name>``,
  ``dvc.exp.baseline=<rev>`` and ``dvc.exp.invocation`` (the pid and start time of the ``dvc`` process
  that runs the stages, so a ``dvc exp run -f -n NAME`` that reuses a name gets a new parent). Later
  stages of that invocation nest under the same run. Each stage marks it RUNNING when it starts and
  closes it again when it ends (FINISHED, or FAILED if the stage failed), listing the stages and
  carrying params.yaml and the summary as far as the workspace has them; the last stage DVC runs
  leaves the final state.
* Plain ``dvc repro``: neither variable, no parent; the stage runs stay grouped by their tags.

The parent lists every stage of ``dvc.lock``: ``ran`` (a run nested under this parent), ``cached``
(DVC skipped it: the run id is the one in the ``run_info.json`` of its outputs, as recorded in
``dvc.lock``) or ``untracked`` (a stage that opens no MLflow run, e.g. ``configure``). It carries
params.yaml, ``reports/summary.json`` as a table and the headline ``reports/metrics.json`` as metrics;
the parent of ``python -m pipeline.run`` also has its time table (``stage_times.json``: each stage's
wall-clock seconds, ran or cached) and the total in the tag ``pipeline.seconds``.
Every call here is outage-tolerant, as the stage runs are: a failure warns and the pipeline goes on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.terminal.console import warn
from pipeline.tracking.experiment import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, flatten, git_info

PARENT_ENV = "BILORA_PARENT_RUN_ID"
ROLE_TAG = "bilora.parent"  # "run" (python -m pipeline.run) or "exp" (dvc exp run)
STAGES_FILE = "stages.json"  # the parent's artifact listing every stage: {stage: {"status", "run_id"}}
STAGE_TIMES_FILE = "stage_times.json"  # python -m pipeline.run's time table (MLflow's table format: columns + data)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _warn(what: str, uri: str, e: Exception) -> None:
    warn(
        f"MLflow parent run at {uri}: {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the stages run without it."
    )


def _experiment_id(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    return exp_id


def open_parent(uri: str, experiment: str, run_name: str, tags: dict[str, str], params_file: str | Path | None = None) -> str | None:
    """Create a RUNNING parent run; its id, or None (tracking unreachable: warned, no parent)."""
    try:
        client = _client(uri)
        run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags={**git_info(), **tags})
        if params_file is not None and Path(params_file).is_file():
            client.log_artifact(run.info.run_id, str(params_file))
        return run.info.run_id
    except Exception as e:  # noqa: BLE001 - tracking must never stop the pipeline
        _warn("creating the parent run", uri, e)
        return None


def _invocation() -> str:
    """``<pid>-<start time>`` of the nearest ``dvc`` process above this one (Linux /proc), or ``""``."""
    pid = os.getppid()
    for _ in range(8):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return ""
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:2]) or argv[1:3] == [b"-m", b"dvc"]:
            return f"{pid}-{stat[19]}"  # field 22 of /proc/<pid>/stat: start time, in clock ticks since boot
        pid = int(stat[1])  # field 4: the parent's pid
        if pid <= 1:
            return ""
    return ""


def exp_parent(uri: str, experiment: str, exp_name: str) -> str | None:
    """The parent run of ``dvc exp run``'s experiment ``exp_name`` (this invocation), created by the first stage."""
    tags = {
        ROLE_TAG: "exp",
        "dvc.exp": exp_name,
        "dvc.exp.baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc.exp.invocation": _invocation(),
    }
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, experiment)
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = client.search_runs([exp_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    except Exception as e:  # noqa: BLE001
        _warn("looking up the experiment's parent run", uri, e)
        return None
    params = Path(os.environ.get("DVC_ROOT") or ".") / "params.yaml"
    return open_parent(uri, experiment, f"exp:{exp_name}", tags, params)


def stage_listing(root: str | Path = ".", ran: dict[str, str] | None = None) -> dict[str, dict[str, str | None]]:
    """{stage: {"status": ran|cached|untracked, "run_id"}} for every stage of ``dvc.lock``; ``ran``: stage -> run id
    of the runs nested under the parent. A stage not in ``ran`` is cached, with the run id of the
    ``run_info.json`` in its outputs (the version ``dvc.lock`` records)."""
    root, ran = Path(root), dict(ran or {})
    lock = root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    out: dict[str, dict[str, str | None]] = {}
    for name, entry in stages.items():
        run_id = None
        for o in entry.get("outs", []):
            info = root / o["path"] / "run_info.json"
            if info.is_file():
                run_id = json.loads(info.read_text()).get("run_id") or run_id
        out[name] = {"status": "cached" if run_id else "untracked", "run_id": run_id}
    for name, run_id in ran.items():
        out[name] = {"status": "ran", "run_id": run_id}
    return dict(sorted(out.items()))


def close_parent(
    uri: str,
    run_id: str,
    status: str = "FINISHED",
    root: str | Path = ".",
    params_file: str | Path | None = None,
    end: bool = True,
    stage_times: list[dict[str, Any]] | None = None,
) -> None:
    """Record on the parent what the workspace now holds (stage listing, params file, summary table,
    headline metrics), ``stage_times`` (``python -m pipeline.run``'s time table: rows of stage, status,
    seconds) as the table ``stage_times.json`` and their sum as the tag ``pipeline.seconds``, and, with
    ``end``, mark it ``status`` with the end time now."""
    root = Path(root)
    try:
        client = _client(uri)
        parent = client.get_run(run_id)
        children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=5000)
        ran = {r.data.tags.get("dvc.stage", r.info.run_name): r.info.run_id for r in sorted(children, key=lambda r: r.info.start_time)}
        listing = stage_listing(root, ran)
        client.log_dict(run_id, listing, STAGES_FILE)
        counts = {s: sum(v["status"] == s for v in listing.values()) for s in ("ran", "cached", "untracked")}
        client.set_tag(run_id, "pipeline.stages", ", ".join(f"{n} {s}" for s, n in counts.items()))
        if stage_times:
            cols = list(stage_times[0])
            client.log_dict(run_id, {"columns": cols, "data": [[r[c] for c in cols] for r in stage_times]}, STAGE_TIMES_FILE)
            client.set_tag(run_id, "pipeline.seconds", f"{sum(r['seconds'] for r in stage_times):.1f}")
        if params_file is not None and Path(params_file).is_file():
            client.log_artifact(run_id, str(params_file))
        summary = root / "reports" / "summary.json"
        if summary.is_file():
            # log_table's own format (columns + rows), written with log_dict: log_table appends to an existing
            # file, and an experiment's parent is closed once per stage
            cols = summary_columns(json.loads(summary.read_text()))
            client.log_dict(run_id, {"columns": list(cols), "data": [list(r) for r in zip(*cols.values())]}, "summary_table.json")
            client.log_artifact(run_id, str(summary), "reports")
        headline = root / "reports" / "metrics.json"
        if headline.is_file():
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            values = [
                Metric(k, float(v), now, 0) for k, v in flatten(json.loads(headline.read_text())).items() if isinstance(v, (int, float))
            ]
            for i in range(0, len(values), 1000):
                client.log_batch(run_id, metrics=values[i : i + 1000])
        if end:
            client.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001
        _warn("closing the parent run", uri, e)


def summary_columns(summary: dict[str, dict[str, Any]]) -> dict[str, list]:
    """``reports/summary.json`` (``task.method`` -> figures) as table columns: ``run`` plus one per figure."""
    keys = sorted({k for row in summary.values() for k in row})
    return {"run": list(summary), **{k: [row.get(k) for row in summary.values()] for k in keys}}
