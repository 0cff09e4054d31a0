"""The MLflow experiment every run goes to: its tracking URI (``$MLFLOW_TRACKING_URI``, default
``sqlite:///mlflow.db`` at the repository root), its kind tag, the code revision a run records, and
nested settings as MLflow's flat scalar params."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


# MLflow 3.17 has no Python constant for the experiment kind: the key and value below are the ones
# its UI reads and writes (mlflow/server/js: ``"mlflow.experimentKind"``, enum value
# ``CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"``, shown as "Machine learning", opening on
# "Training runs"; ``"genai_development"`` opens the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become strings (MLflow params are scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
