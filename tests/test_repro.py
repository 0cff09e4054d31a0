"""``python -m pipeline.run``'s progress line and time table (pipeline/repro.py), from recorded DVC output.

DVC's own lines are fed to :class:`pipeline.repro.Timeline` with a fake clock; :func:`pipeline.repro.run`
relays a stand-in ``dvc`` (a script printing those lines) through a pipe, and the parent run keeps the table.
The real pipeline's output is checked by the slow tests (tests/test_pipeline.py, tests/test_group.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline import repro

ROOT = Path(__file__).resolve().parents[1]

# A second `python -m pipeline.run` after a train param changed (DVC 3.x's wording; one line colored as on a terminal).
RECORDED = """\
'data/raw/sst2.dvc' didn't change, skipping
Stage 'prepare' didn't change, skipping
Stage 'load_base' didn't change, skipping
\x1b[1mRunning stage 'configure':\x1b[0m
> python -m stages.configure
─ configure 1 task(s) x 2 method(s) x 1 seed(s)
Updating lock file 'dvc.lock'

Stage 'finetune@sst2-lora-0' is cached - skipping run, checking out outputs
Running stage 'finetune@sst2-bilora-0':
> python -m stages.launch finetune --task sst2 --method bilora --seed 0
Updating lock file 'dvc.lock'

Stage 'evaluate@sst2-lora-0' didn't change, skipping
Running stage 'evaluate@sst2-bilora-0':
> python -m stages.evaluate --task sst2 --method bilora --seed 0
Running stage 'merge':
> python -m stages.merge
Running stage 'report':
> python -m stages.report
Updating lock file 'dvc.lock'
Use `dvc push` to send your updates to remote storage.
"""


class Clock:
    """Each reading one second after the last."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_the_timeline_reads_dvcs_lines_into_progress_lines_and_stage_times():
    timeline = repro.Timeline(total=9, clock=Clock())  # start at t=1
    notes = [n for line in RECORDED.splitlines(keepends=True) if (n := timeline.feed(line))]
    assert notes == [
        "stage 3 of 9: configure",  # prepare and load_base were reached (skipped) first
        "stage 5 of 9: finetune@sst2-bilora-0",
        "stage 7 of 9: evaluate@sst2-bilora-0",
        "stage 8 of 9: merge",
        "stage 9 of 9: report",
    ]
    times = timeline.times(end=20.0)
    assert [(t.stage, t.status) for t in times] == [
        ("dvc start", ""),
        ("prepare", "cached"),
        ("load_base", "cached"),
        ("configure", "ran"),
        ("finetune@sst2-lora-0", "cached"),  # restored from DVC's run cache
        ("finetune@sst2-bilora-0", "ran"),
        ("evaluate@sst2-lora-0", "cached"),
        ("evaluate@sst2-bilora-0", "ran"),
        ("merge", "ran"),
        ("report", "ran"),
    ]
    # each stage's clock runs from its line to the next stage's line; the last one's to DVC's exit
    assert [t.seconds for t in times] == [1.0] * 9 + [10.0]
    assert sum(t.seconds for t in times) == 20.0 - 1.0
    assert repro.as_rows(times)[-1] == {"stage": "report", "status": "ran", "seconds": 10.0}


def test_without_a_known_total_the_progress_line_counts_only():
    timeline = repro.Timeline(total=None, clock=Clock())
    assert timeline.feed("Running stage 'finetune@sst2-lora-0':\n") == "stage 1: finetune@sst2-lora-0"
    two = repro.Timeline(total=1, clock=Clock())  # more stages than expected (the count was off): no "of N"
    two.feed("Running stage 'a':\n")
    assert two.feed("Running stage 'b':\n") == "stage 2: b"


def test_relay_keeps_every_byte_in_order_and_puts_the_progress_line_right_after_its_stage_line():
    out: list[bytes] = []
    data = RECORDED.encode()
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]  # lines split across chunks, as a pipe delivers them
    repro._lines(iter(chunks), out.append, repro.Timeline(9, Clock()), lambda n: out.append(f"<{n}>\n".encode()))
    text = b"".join(out).decode()
    assert text.count("<stage ") == 5
    assert "Running stage 'configure':\x1b[0m\n<stage 3 of 9: configure>\n> python -m stages.configure" in text
    assert "\n".join(line for line in text.splitlines() if not line.startswith("<")) + "\n" == RECORDED


def test_run_relays_a_dvc_stand_in_through_a_pipe_and_returns_its_exit_code(tmp_path, capfdbinary):
    script = tmp_path / "fake_dvc.py"
    script.write_text(f"import sys\nsys.stdout.write({RECORDED!r})\nsys.stdout.flush()\nsys.exit(3)\n")
    notes: list[str] = []
    timeline = repro.Timeline(9)
    rc = repro.run([sys.executable, str(script)], {}, timeline, notes.append)
    assert rc == 3
    assert capfdbinary.readouterr().out.decode() == RECORDED
    assert notes[0] == "stage 3 of 9: configure" and len(notes) == 5
    assert [t.stage for t in timeline.times()][-1] == "report"


def test_the_pipeline_has_the_stages_dvc_goes_through():
    # prepare, load_base, configure, merge, report + finetune and evaluate per run of the matrix (+ evaluate_only per eval task)
    import yaml

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs = len(p["data"]["tasks"]) * len(p["train"]["methods"]) * len(p["train"]["seeds"])
    evals = len(p["data"].get("eval_tasks") or []) * len(p["train"]["methods"]) * len(p["train"]["seeds"])
    assert repro.pipeline_stages(ROOT) in (5 + 2 * runs + evals, 5 + 2 * runs)


def test_the_summary_ends_with_the_time_table():
    from rich.console import Console

    from pipeline.run import times_table

    times = [
        repro.StageTime("checks", "", 2.0),
        repro.StageTime("dvc start", "", 3.0),
        repro.StageTime("finetune@sst2-lora-0", "ran", 95.0),
    ]
    console = Console(width=80, record=True)
    console.print(times_table(times))
    text = console.export_text()
    assert "where the time went" in text and "finetune@sst2-lora-0" in text
    assert " 95.0 " in text and "95 %" in text and "100.0" in text


def test_the_parent_run_keeps_the_time_table(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import load_dict

    from pipeline.tracking import parent

    monkeypatch.chdir(tmp_path)  # the store's artifacts go next to it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = parent.open_parent(uri, "bilora", "pipeline.run test", {parent.ROLE_TAG: "run"})
    rows = [{"stage": "checks", "status": "", "seconds": 2.0}, {"stage": "prepare", "status": "cached", "seconds": 0.5}]
    parent.close_parent(uri, run_id, root=tmp_path, stage_times=rows)
    run = MlflowClient(uri).get_run(run_id)
    table = load_dict(run.info.artifact_uri + "/" + parent.STAGE_TIMES_FILE)
    assert table == {"columns": ["stage", "status", "seconds"], "data": [["checks", "", 2.0], ["prepare", "cached", 0.5]]}
    assert run.data.tags["pipeline.seconds"] == "2.5" and run.data.metrics == {}  # no metric: the headline ones stay alone
