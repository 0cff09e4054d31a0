"""Run the real DVC stage entry points (``python -m stages.<name>``) in a temporary working dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def tiny_params(**overrides) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(tasks=["sst2"], train_subset=48, max_length=16, test_subset=16)
    raw["train"].update(methods=["lora"], seeds=[0])
    raw["train"]["loop"].update(max_steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    raw["merge"].update(task="sst2", method="lora", seed=0)
    return raw


def make_workdir(tmp: Path, params: dict | None = None, rows: int = 120) -> Path:
    """A working dir with params.yaml and the first ``rows`` rows of SST-2 (train and dev)."""
    wd = tmp / "wd"
    src = ROOT / "data" / "raw" / "glue" / "SST-2"
    dst = wd / "data" / "raw" / "glue" / "SST-2"
    dst.mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        lines = (src / f).read_text(encoding="utf-8").splitlines(keepends=True)
        (dst / f).write_text("".join(lines[: rows + 1]), encoding="utf-8")
    write_params(wd, params or tiny_params())
    return wd


def write_params(wd: Path, params: dict) -> None:
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_env(wd: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{wd / 'mlflow.db'}",
        TOKENIZERS_PARALLELISM="false",
        COLUMNS="2000",
    )
    env.update(extra)
    return env


def run_stage(wd: Path, stage: str, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args], cwd=wd, env=stage_env(wd, **env), capture_output=True, text=True, timeout=timeout
    )


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` (relative name -> bytes), or None when ``path`` is absent."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_artifacts(src: Path, dst: Path, *names: str) -> None:
    for n in names:
        shutil.copytree(src / "artifacts" / n, dst / "artifacts" / n)
