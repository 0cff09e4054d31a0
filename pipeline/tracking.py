"""MLflow tracking: one run per stage execution, tagged so runs group without a parent run.

Tags on every run: ``dvc.stage`` ($DVC_STAGE), ``dvc.exp`` ($DVC_EXP_NAME when present),
``git.commit``, ``git.dirty``, and the run's ``task``/``method``/``seed`` where they apply.
The default tracking URI is ``sqlite:///mlflow.db`` at the repository root; ``MLFLOW_TRACKING_URI``
overrides it. If the tracking server is unreachable the stage still completes: the tracker warns
once and turns into a no-op; metrics stay in the DVC outputs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.console import warn


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_info() -> dict[str, str]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=repo_root(), capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = run("git", "rev-parse", "HEAD") or "unknown"
    dirty = run("git", "status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


class Tracker:
    """A thin, outage-tolerant wrapper around one MLflow run."""

    def __init__(self, stage: str, experiment: str, params: dict[str, Any], tags: dict[str, Any] | None = None, run_name: str | None = None) -> None:
        self.stage = stage
        self.run_id: str | None = None
        self.enabled = True
        self.uri = tracking_uri()
        self._mlflow = None
        all_tags = {"dvc.stage": os.environ.get("DVC_STAGE", stage), **git_info(), **{k: str(v) for k, v in (tags or {}).items()}}
        if os.environ.get("DVC_EXP_NAME"):
            all_tags["dvc.exp"] = os.environ["DVC_EXP_NAME"]
        self.tags = all_tags
        self._guard(self._start, experiment, params, run_name or all_tags["dvc.stage"])

    def _start(self, experiment: str, params: dict[str, Any], run_name: str) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name, tags=self.tags)
        self.run_id = run.info.run_id
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))

    def _guard(self, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never kill a stage
            self.enabled = False
            warn(f"MLflow tracking at {self.uri} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); continuing without tracking. Results are still in the DVC outputs.")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._guard(lambda: self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._guard(lambda: self._mlflow.log_artifacts(str(local_dir), artifact_path))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._guard(lambda: self._mlflow.log_artifact(str(local_path), artifact_path))

    def log_dict(self, obj: dict, name: str) -> None:
        self._guard(lambda: self._mlflow.log_dict(obj, name))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._guard(lambda: self._mlflow.set_tags({k: str(v) for k, v in tags.items()}))

    def end(self, status: str = "FINISHED") -> None:
        self._guard(lambda: self._mlflow.end_run(status=status))

    def info(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "tracked": self.enabled and self.run_id is not None, "tags": self.tags}

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")
