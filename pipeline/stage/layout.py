"""Where every stage reads and writes (relative to the repository root)."""

from __future__ import annotations

from pathlib import Path

from pipeline.terminal.user_error import UserError

ARTIFACTS = Path("artifacts")
DATA = ARTIFACTS / "data"
BASE = ARTIFACTS / "base"
MERGED = ARTIFACTS / "merged"
REPORTS = Path("reports")
REPORT_RUN = ARTIFACTS / "report"  # the report stage's run_info.json (its MLflow run id), a cached out like every stage's


def run_name(task: str, method: str, seed: int) -> str:
    """Matches DVC's matrix instance names: finetune@<task>-<method>-<seed>."""
    return f"{task}-{method}-{seed}"


def finetune_dir(name: str) -> Path:
    return ARTIFACTS / "finetune" / name


def checkpoint_dir(name: str) -> Path:
    return ARTIFACTS / "checkpoints" / name


def eval_dir(name: str) -> Path:
    return ARTIFACTS / "eval" / name


def metrics_path(name: str) -> Path:
    """Git-tracked detail figures of one evaluate run (a plain ``cache: false`` out the report reads); the
    DVC ``metrics:`` file is the report's headline ``reports/metrics.json`` (``dvc exp show``)."""
    return Path("metrics") / f"{name}.json"


RUNS = ARTIFACTS / "runs"


def run_settings_path(name: str) -> Path:
    """Resolved settings of one finetune run, written by the ``configure`` stage (pipeline/config/runs.py)."""
    return RUNS / f"{name}.json"


def check_inputs(task: str) -> None:
    """The upstream stages' outputs a finetune run reads exist (a clear message instead of a load error;
    torch-free, so a missing input fails before the training stack is imported)."""
    for need, producer in ((BASE / "model" / "config.json", "load_base"), (DATA / task / "dataset_dict.json", "prepare")):
        if not need.is_file():
            raise UserError(
                f"{need}: not found (output of stage '{producer}'); run `dvc repro {producer}` first (task must be in data.tasks)"
            )
