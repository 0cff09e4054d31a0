"""bench.first_run (README command 1 in a fresh clone, timed) and bench.stage_imports, without running the pipeline."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench import first_run, machine, stage_imports

ROOT = Path(__file__).resolve().parents[1]

TIMES = {  # what `python -m pipeline.run --times FILE` writes
    "exit_code": 0,
    "stages": [
        {"stage": "checks", "status": "", "seconds": 3.0},
        {"stage": "dvc start", "status": "", "seconds": 2.0},
        {"stage": "prepare", "status": "ran", "seconds": 15.0},
        {"stage": "finetune@sst2-lora-0", "status": "ran", "seconds": 80.0},
    ],
}
INFO = {
    "command": "python -m bench.first_run",
    "commit": "abc1234",
    "date": "2026-01-01",
    "machine": "AMD EPYC, 2 cores, AVX2-only",
    "cpu_class": "AVX2-only",
    "load_before": "0.10 / 0.20 / 0.30",
    "load_after": "1.90 / 1.50 / 0.90",
    "install": "not run",
    "changed": [],
}


def test_the_report_names_the_machine_class_and_each_stages_seconds():
    text = first_run.report(INFO, TIMES)
    assert "CPU class **AVX2-only**" in text and "0.10 / 0.20 / 0.30 before" in text
    assert "**100 s** (1.7 min), exit code 0; it reproduced the committed figures exactly." in text
    assert "| finetune@sst2-lora-0 | ran | 80.0 | 80 % |" in text and "| **total** | | **100.0** | 100 % |" in text
    changed = first_run.report(INFO | {"changed": ["metrics/sst2-lora-0.json"]}, TIMES)
    assert "figures that differ from the committed ones: metrics/sst2-lora-0.json" in changed


def test_dry_run_clones_the_committed_head_and_prints_readme_command_1(tmp_path, capsys):
    first_run.main(["--dry-run", "--install", "--out", str(tmp_path / "first_run.md")])
    out = capsys.readouterr().out
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert f"(commit {head})" in out and first_run.README_INSTALL in out
    assert "-m pipeline.run --times" in out and "/.venv/bin/python" in out
    assert not (tmp_path / "first_run.md").exists()  # a dry run writes nothing
    clone = Path(out.split("clone: ")[1].split(" ")[0])
    assert not clone.exists()  # nor keeps its clone


def test_readme_command_1_is_what_the_benchmark_installs():
    readme = (ROOT / "README.md").read_text()
    assert f"{first_run.README_INSTALL} && .venv/bin/python -m pipeline.run" in readme


def test_machine_and_import_time_parsing():
    assert machine.cpu_class() in ("avx512_bf16", "AVX2-only") and machine.cores() >= 1
    importtime = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   encodings\n"
        "import time:        50 |       2500 | stages.configure\n"
        "import time:        40 |       1000 |   pipeline.config\n"
        "import time:        10 |        500 | site\n"
    )
    assert stage_imports.top_level_seconds(importtime) == 0.003  # the two top-level lines
